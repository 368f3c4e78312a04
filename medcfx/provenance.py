"""Provenance records: every output medcfx writes can be traced to the model, the inputs and the settings.

``record(request, entry, params, inputs)`` returns a JSON-able dict with the medcfx version, the method,
the model reference and its weights' sha256, the sampling parameters, the seed and device, each input
file's sha256 and the command line. ``write_json`` writes any such record atomically.
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path

import medcfx
from medcfx import staging, strict_json
from medcfx.registry import sha256_file


def _inputs(paths) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            out.append({"path": str(f), "sha256": sha256_file(f), "bytes": f.stat().st_size})
    return out


def record(request, entry, params: dict, inputs=(), **extra) -> dict:
    """The provenance of one output: version, command, model and its sha256, parameters, seed, device, the
    CPU thread count (results differ in the last bits between thread counts, see docs/architecture.md
    "Determinism") and the sha256 of every input file."""
    import torch

    return {
        "medcfx_version": medcfx.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "medcfx " + " ".join(sys.argv[1:]),
        "method": request.method.name,
        "model": entry.ref if entry is not None else None,
        "model_sha256": entry.digest if entry is not None else None,
        "params": params,
        "seed": request.seed,
        "device": request.device,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "inputs": _inputs(inputs),
        **({"resume_key": request.extra["resume_key"]} if (request.extra or {}).get("resume_key") else {}),
        **extra,
    }


def write_json(path: Path, obj) -> Path:
    """Write ``obj`` as indented, strict JSON atomically (:func:`medcfx.staging.atomic_write_bytes`: never a
    half-written file); creates the parent folder. A value that could not be computed (NaN, inf) is written
    as null, the reason is recorded under ``null_values`` (``{"metrics.pixel_AUPRC": "NaN: ..."}``) and a
    warning naming the file goes to stderr (:mod:`medcfx.strict_json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging.atomic_write_bytes(path, strict_json.dumps(obj, indent=1, default=str, warn=str(path)).encode())
    return path
