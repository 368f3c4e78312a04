"""``medcfx bench REF --volume``: one whole volume through ``medcfx explain``, end to end, per sampler.

Each run is a real ``medcfx explain`` subprocess on the same case (reading, preprocessing, sampling every
foreground slice in batches, writing the volumes, panels and provenance), timed by wall clock, with its peak
resident set size from the operating system (``ru_maxrss``, see :func:`measured_run`). Without ``--case``
the volume is a synthetic BraTS-sized case (240 x 240 x 155 voxels of 1 mm, 4 contrasts, one tumour;
``medcfx data demo brain``), made once in a temporary folder. The slices explain samples are those with
foreground (``preprocess.min_foreground``); the others are skipped and their heatmap is 0 by definition, so
the time per sampled slice is reported beside the time per volume.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medcfx.errors import MedcfxError, UsageError

BRATS_SHAPE = (240, 240, 155)  # BraTS 2021 volumes: 240 x 240 x 155 at 1 mm
SAMPLER_METHODS = ("sanchez", "cdpm-healthy", "cdpm-classifier")  # explain has --sampler paper|fast


def synthetic_volume(folder: Path, shape: tuple[int, int, int] = BRATS_SHAPE, seed: int = 0) -> Path:
    """A BraTS-layout case folder (t1, t1ce, t2, flair, seg NIfTI of ``shape``) under ``folder``."""
    from medcfx.demo import make_demo

    data = make_demo("brain", folder, cases=1, seed=seed, shape=tuple(shape), tumour_free_fraction=0.0)
    return next(p for p in sorted(data.iterdir()) if p.is_dir())


# A child's peak RSS from wait4 / RUSAGE_CHILDREN includes its parent's resident memory at fork time (Linux
# carries the high-water mark across fork and exec), so a big parent (a benchmark holding a network) would
# inflate it. The command therefore runs under a small fresh Python that reports its own children's peak.
_RSS_WRAPPER = ("import resource, subprocess, sys; "
                "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
                "sys.stderr.write(p.stderr); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def measured_run(cmd: list[str]) -> tuple[float, float, int, str]:
    """Run ``cmd``: (wall seconds, its peak RSS in MiB, exit code, its stderr). The peak is the command's own
    (``ru_maxrss`` of a child of a small wrapper process, KiB on Linux), not inflated by this process."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = p.stdout.strip().splitlines()
    return seconds, int(lines[-1]) / 1024 if lines else float("nan"), p.returncode, p.stderr


def run_explain(case: Path, ref: str, out: Path, args: list[str]) -> dict:
    """Wall seconds, peak RSS (MiB) and sampled slices of one ``medcfx explain`` subprocess. Raises
    MedcfxError with the command's last error line when it fails."""
    cmd = [sys.executable, "-m", "medcfx", "explain", str(case), "--model", ref, "--out", str(out), *args]
    seconds, peak, code, err = measured_run(cmd)
    if code != 0:
        last = [ln for ln in err.splitlines() if ln.strip()][-1:] or ["(no message)"]
        raise MedcfxError(f"explain failed on {case} (exit {code}): {last[0]}")
    prov = json.loads((out / case.name / "provenance.json").read_text())
    return {"seconds": seconds, "peak_rss_mib": peak, "sampled_slices": len(prov["slices"]),
            "params": prov["params"]}


def settings_text(params: dict) -> str:
    """A provenance ``params`` record's sampling settings in a few words."""
    return (f"{params.get('solver')} {params.get('steps')} steps"
            + (", reuse inversion" if params.get("reuse_inversion") else "")
            + (f", guidance {params['guidance_interval']}" if params.get("guidance_interval", "0:1") != "0:1" else ""))


def bench_volume(registry, ref: str, case: Path | None, samplers: list[str], batch: int, console,
                 extra: list[str] | None = None, backend: str | None = None) -> list[dict]:
    """Time ``medcfx explain`` of one volume with each ``--sampler`` in ``samplers`` (same case, same
    ``--batch-size``; ``extra`` explain arguments and ``backend`` for every run). Returns one row per sampler: seconds per
    volume and per sampled slice, sampled / total slices, peak RSS in MiB, speed-up against the first row.
    UsageError before any work for an unknown model or a missing case."""
    import nibabel as nib
    from rich.table import Table

    entry = registry.resolve(ref)
    if entry.method not in SAMPLER_METHODS:
        raise UsageError(f"--volume compares explain's --sampler paths, which {entry.method} models do not have "
                         f"(methods with them: {', '.join(SAMPLER_METHODS)})")
    if backend == "onnx" and "onnx" not in entry.artifacts:
        raise UsageError(f"model {entry.ref} has no ONNX export: run `medcfx export {entry.ref} --format onnx`")
    if case is not None and not case.exists():
        raise UsageError(f"--case {case}: no such file or folder")
    rows = []
    with tempfile.TemporaryDirectory(prefix="medcfx-bench-volume-") as tmp:
        if case is None:
            console.print(f"making a synthetic BraTS-sized case ({' x '.join(map(str, BRATS_SHAPE))}, 4 contrasts)")
            case = synthetic_volume(Path(tmp) / "data")
        first = next(p for p in sorted(case.rglob("*.nii*")) if "seg" not in p.name) if case.is_dir() else case
        shape = tuple(int(s) for s in nib.load(first).shape[:3])
        for i, sampler in enumerate(samplers):
            args = ["--sampler", sampler, "--batch-size", str(batch), *(extra or []),
                    *(["--backend", backend] if backend else [])]
            r = run_explain(case, entry.ref, Path(tmp) / f"out{i}", args)
            rows.append({"sampler": sampler, "volume_shape": list(shape), "batch": batch, **r,
                         "seconds_per_sampled_slice": r["seconds"] / max(r["sampled_slices"], 1)})
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_first"] = base / r["seconds"]
    table = Table(title=f"explain of one {' x '.join(map(str, shape))} volume with {entry.ref} (batch {batch})")
    for c in ("sampler", "settings", "s / volume", "sampled slices", "s / sampled slice", "peak RSS",
              "speed-up vs first"):
        table.add_column(c)
    for r in rows:
        p = r["params"]
        settings = settings_text(p)
        table.add_row(r["sampler"], settings, f"{r['seconds']:.1f}", str(r["sampled_slices"]),
                      f"{r['seconds_per_sampled_slice']:.2f}", f"{r['peak_rss_mib']:.0f} MiB",
                      f"{r['speedup_vs_first']:.2f}x")
    console.print(table)
    return rows
