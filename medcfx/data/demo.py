"""Offline demo datasets: small synthetic stand-ins written in the layouts of the real data.

Three kinds, each in its own module with its own options:

========== ====================================== ============================================================
kind        module                                 layout written
========== ====================================== ============================================================
brain       :mod:`medcfx.data.demo_brain`          BraTS case folders ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``
vertebra    :mod:`medcfx.data.demo_vertebra`       image folder: ``images/*.png`` (16-bit, HU + 1024) + ``labels.csv``
chest       :mod:`medcfx.data.demo_chest`          image folder: ``images/*.png`` (8-bit) + ``labels.csv``
========== ====================================== ============================================================

:func:`make_demo` is the single entry point (the ``medcfx data demo`` command calls it). Every kind is
deterministic: case ``i`` is drawn from ``numpy.random.SeedSequence([seed, i])`` (plus a per-kind salt), so
the same seed gives the same arrays and a case does not depend on how many cases were asked for.

Writing is atomic: everything goes into a hidden temporary sibling of ``out`` which is renamed to ``out``
only when complete; an exception (or Ctrl-C) removes the temporary folder, so ``out`` is either absent,
untouched, or complete. The data is plainly synthetic: see docs/data.md for what it does and does not model.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from medcfx import staging
from medcfx.errors import UsageError

DEMO_KINDS = ("brain", "vertebra", "chest")

_MAKERS = {
    "brain": ("medcfx.data.demo_brain", "make_brain"),
    "vertebra": ("medcfx.data.demo_vertebra", "make_vertebra"),
    "chest": ("medcfx.data.demo_chest", "make_chest"),
}

# a different salt per kind, so that seed 0 of one kind does not share its random stream with another kind
_SALT = {"brain": 0xB7A1, "vertebra": 0x5E27, "chest": 0xC4E5}


def demo_maker(kind: str) -> Callable[..., Path]:
    """The per-kind writer ``make_<kind>(out, cases=None, seed=0, *, overwrite=False, **options)``."""
    if kind not in _MAKERS:
        raise UsageError(f"unknown demo kind {kind!r}; choose one of: {', '.join(DEMO_KINDS)}")
    module, name = _MAKERS[kind]
    return getattr(importlib.import_module(module), name)


def demo_options(kind: str) -> dict[str, object]:
    """The keyword options of one kind with their defaults (for ``--help`` texts and validation)."""
    sig = inspect.signature(demo_maker(kind))
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if p.kind == inspect.Parameter.KEYWORD_ONLY and n != "overwrite"
    }


def make_demo(kind: str, out: str | Path, cases: int | None = None, seed: int = 0, **opts) -> Path:
    """Write ``cases`` synthetic cases of ``kind`` into the folder ``out`` and return ``out``.

    ``cases=None`` takes the kind's default (brain 20, vertebra 400, chest 400). ``opts`` are the kind's own
    keyword options (see :func:`demo_options`) plus ``overwrite=True`` to replace a non-empty ``out``.
    Raises :class:`~medcfx.errors.UsageError` for an unknown kind, an unknown option, a bad value or a
    non-empty ``out`` without ``overwrite``.
    """
    maker = demo_maker(kind)
    allowed = set(demo_options(kind)) | {"overwrite"}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise UsageError(
            f"unknown option {unknown[0]!r} for demo kind {kind!r}; valid options: {', '.join(sorted(allowed))}"
        )
    return maker(out, cases=cases, seed=seed, **opts)


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the kinds


def case_rng(kind: str, seed: int, index: int) -> np.random.Generator:
    """The random generator of case ``index``: independent of the number of cases and of the other kinds."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SALT[kind], int(index)]))


def set_rng(kind: str, seed: int) -> np.random.Generator:
    """The random generator for dataset-level choices (which rows are graded / unlabelled / tumour-free)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SALT[kind], 0x5E7]))


def check_cases(cases: int | None, default: int) -> int:
    n = default if cases is None else cases
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"option cases must be a positive integer, got {cases!r}")
    return int(n)


def check_fraction(name: str, value: float) -> float:
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
    """Separable Gaussian blur of a 2-D array (reflecting borders), in numpy; ``sigma`` in pixels."""
    if sigma <= 0:
        return img.astype(np.float32, copy=True)
    r = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(i, i + out.shape[axis])
            acc += w * p[tuple(sl)]
        out = acc
    return out.astype(np.float32)


def smooth_noise2d(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise blurred by a Gaussian of ``sigma`` pixels and rescaled to unit standard deviation."""
    n = gauss_blur2d(rng.standard_normal(shape).astype(np.float32), sigma)
    return (n - n.mean()) / (n.std() + 1e-8)


__all__ = ["DEMO_KINDS", "make_demo", "demo_maker", "demo_options"]
