"""Strict JSON: a number that could not be computed is written as ``null`` with a note, never as ``NaN``.

Python's ``json.dumps`` writes ``NaN`` / ``Infinity`` by default, which is not JSON (``jq``, JavaScript,
most JSON readers refuse the whole file). A validation metric on a split without a lesion, an AUROC over
one class, are NaN legitimately; medcfx writes them as ``null`` and says why:

- :func:`finite` returns a copy with every non-finite float replaced by None and a mapping
  ``{dotted path: reason}`` (``"NaN: could not be computed"``, ``"+inf"`` ...);
- :func:`dumps` is ``json.dumps(..., allow_nan=False)`` after :func:`finite`; for a dict it adds the notes
  under :data:`NOTES_KEY` and warns on stderr once per call (``warn=True``).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable

NOTES_KEY = "null_values"
NAN_REASON = "NaN: could not be computed (e.g. a metric over a split with no positive or no negative case)"


def _reason(value: float) -> str:
    if math.isnan(value):
        return NAN_REASON
    return "+inf: not a finite number" if value > 0 else "-inf: not a finite number"


def finite(obj: Any, where: str = "") -> tuple[Any, dict[str, str]]:
    """``(copy of obj with non-finite floats -> None, {dotted path: reason})``. Dicts, lists and tuples are
    walked (tuples become lists); numpy / torch scalars are read with ``.item()``; anything else is kept."""
    notes: dict[str, str] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            notes[path or "(value)"] = _reason(value)
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        item, shape = getattr(value, "item", None), getattr(value, "shape", None)
        if callable(item) and shape is not None and tuple(shape) == ():
            return walk(item(), path)
        return value

    return walk(obj, where), notes


def warn_nulls(notes: dict[str, str], what: str) -> None:
    """One line on stderr naming the values written as null (nothing when there are none)."""
    if notes:
        keys = ", ".join(list(notes)[:6]) + (f" and {len(notes) - 6} more" if len(notes) > 6 else "")
        print(f"medcfx: warning: {what}: {keys} could not be computed (NaN) or were not finite; written as null",
              file=sys.stderr, flush=True)


def dumps(obj: Any, *, indent: int | None = None, default: Callable | None = str, warn: str | None = None,
          note: bool = True) -> str:
    """Strict JSON text of ``obj``: non-finite floats become null; when ``obj`` is a dict and ``note`` is
    true, the reasons are added under :data:`NOTES_KEY`; ``warn`` (a description of what is written) prints
    the warning line of :func:`warn_nulls`."""
    clean, notes = finite(obj)
    if notes and note and isinstance(clean, dict):
        prior = clean.get(NOTES_KEY)
        clean = {**clean, NOTES_KEY: {**(prior if isinstance(prior, dict) else {}), **notes}}
    if warn:
        warn_nulls(notes, warn)
    return json.dumps(clean, indent=indent, default=default, allow_nan=False)
