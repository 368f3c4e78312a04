"""Helpers shared by the demo kinds (:mod:`medcfx.demo.brain`, :mod:`~medcfx.demo.vertebra`,
:mod:`~medcfx.demo.chest`): per-case random generators, option checks, atomic writing, CSV, smooth noise.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy import ndimage

from medcfx import staging
from medcfx.errors import UsageError

# a different salt per kind, so that seed 0 of one kind does not share its random stream with another kind
_SALT = {"brain": 0xB7A1, "vertebra": 0x5E27, "chest": 0xC4E5}


def case_rng(kind: str, seed: int, index: int) -> np.random.Generator:
    """The random generator of case ``index``: independent of the number of cases and of the other kinds."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SALT[kind], int(index)]))


def set_rng(kind: str, seed: int) -> np.random.Generator:
    """The random generator for dataset-level choices (which rows are graded / unlabelled / tumour-free)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SALT[kind], 0x5E7]))


def check_cases(cases: int | None, default: int) -> int:
    """The number of cases: ``default`` for None, else a positive integer (UsageError otherwise)."""
    n = default if cases is None else cases
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"option cases must be a positive integer, got {cases!r}")
    return int(n)


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float in [0, 1] (UsageError naming option ``name`` otherwise)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"option {name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise UsageError(f"option {name} must be in [0, 1], got {value!r}")
    return v


def check_probs(name: str, probs, n: int) -> np.ndarray:
    """A probability vector of length ``n`` (normalised to sum 1)."""
    try:
        p = np.asarray([float(v) for v in probs], dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"option {name} must be {n} non-negative numbers, got {probs!r}") from None
    if p.shape != (n,) or (p < 0).any() or p.sum() <= 0:
        raise UsageError(f"option {name} must be {n} non-negative numbers with a positive sum, got {probs!r}")
    return p / p.sum()


def exact_subset(rng: np.random.Generator, n: int, fraction: float, always: int = 0) -> np.ndarray:
    """A boolean mask of length ``n`` with exactly ``round(fraction * n)`` True entries.

    The first ``always`` entries are always True (counted in the total when the total allows it); the rest
    are chosen uniformly at random without replacement.
    """
    k = int(round(fraction * n))
    always = min(always, n)
    mask = np.zeros(n, dtype=bool)
    mask[:always] = True
    extra = max(k - always, 0)
    if extra:
        mask[always + rng.choice(n - always, size=extra, replace=False)] = True
    return mask


@contextlib.contextmanager
def staging_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success it replaces ``out``, on failure it is removed.

    ``out`` may be absent or an empty folder; a non-empty folder needs ``overwrite=True`` (its old content
    is removed only after the new content is complete). A file at ``out`` is refused.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output folder {out} is not empty; pass overwrite=True (--overwrite) to replace it")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the parent folder of {out}: {exc.strerror}") from None
    staging.sweep(parent)  # what a killed earlier run left there
    with staging.staged_folder(parent / out.name) as tmp:
        yield tmp


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    """A plain comma-separated file; ``None`` becomes an empty cell, floats are written with 4 decimals."""
    import csv

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.4f}"
        return str(v)

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow([cell(v) for v in r])


def gauss_blur2d(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D array, float32; ``sigma`` in pixels, kernel radius ceil(3 sigma), borders
    reflected without repeating the edge pixel (computed in float64 by :func:`gauss_blur1d` per axis)."""
    out = img.astype(np.float64)
    for axis in (0, 1):
        out = gauss_blur1d(out, sigma, axis)
    return out.astype(np.float32)


def gauss_blur1d(img: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Gaussian blur along one axis in float64 (``scipy.ndimage.gaussian_filter1d``, mode ``mirror``,
    radius ceil(3 sigma)); ``sigma <= 0`` returns the input unchanged."""
    if sigma <= 0:
        return img
    radius = max(1, int(np.ceil(3 * sigma)))
    return ndimage.gaussian_filter1d(np.asarray(img, dtype=np.float64), sigma, axis=axis, mode="mirror", radius=radius)


def smooth_noise2d(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise blurred by a Gaussian of ``sigma`` pixels and rescaled to unit standard deviation."""
    n = gauss_blur2d(rng.standard_normal(shape).astype(np.float32), sigma)
    return (n - n.mean()) / (n.std() + 1e-8)

