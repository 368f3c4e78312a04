"""Offline demo datasets: small synthetic stand-ins written in the layouts of the real data.

Three kinds, each in its own module with its own options:

========== ====================================== ============================================================
kind        module                                 layout written
========== ====================================== ============================================================
brain       :mod:`medcfx.demo.brain`              BraTS case folders ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``
vertebra    :mod:`medcfx.demo.vertebra`           image folder: ``images/*.png`` (16-bit, HU + 1024) + ``labels.csv``
chest       :mod:`medcfx.demo.chest`              image folder: ``images/*.png`` (8-bit) + ``labels.csv``
========== ====================================== ============================================================

:func:`make_demo` is the single entry point (the ``medcfx data demo`` command calls it). Every kind is
deterministic: case ``i`` is drawn from ``numpy.random.SeedSequence([seed, i])`` (plus a per-kind salt), so
the same seed gives the same arrays and a case does not depend on how many cases were asked for.

Writing is atomic: everything goes into a hidden temporary sibling of ``out`` which is renamed to ``out``
only when complete; an exception (or Ctrl-C) removes the temporary folder, so ``out`` is either absent,
untouched, or complete. The data is plainly synthetic: see docs/data.md for what it does and does not model.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Callable

from medcfx.errors import UsageError

DEMO_KINDS = ("brain", "vertebra", "chest")

_MAKERS = {
    "brain": ("medcfx.demo.brain", "make_brain"),
    "vertebra": ("medcfx.demo.vertebra", "make_vertebra"),
    "chest": ("medcfx.demo.chest", "make_chest"),
}


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


__all__ = ["DEMO_KINDS", "make_demo", "demo_maker", "demo_options"]
