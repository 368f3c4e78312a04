"""Benchmark: ``medcfx.data.prepare`` on a BraTS-sized dataset versus nibabel loading alone.

    python benchmarks/data_prepare.py                 # 50 synthetic cases of 4 x 240 x 240 x 155 float32
    python benchmarks/data_prepare.py --cases 4       # quick check
    python benchmarks/data_prepare.py --data /path/to/BraTS2021 [--size 64]

Measures, each in a fresh subprocess (so peak RSS is that step's own):
  (1) nibabel alone: ``nib.load(f).get_fdata(dtype=float32)`` for every modality and seg file;
  (2) ``prepare()`` into an empty cache (cold): seconds, cases/s, peak RSS (VmHWM of the process);
  (3) ``prepare()`` again (cache hit).
Wall and CPU seconds are both reported; ``--repeat N`` interleaves N runs of (1) and (2) and keeps the
fastest of each (the machine may be shared).
Target: (2) within 2x of (1); peak RSS bounded by a few cases, independent of the number of cases.
Results go to docs/benchmarks.md between ``<!-- data_prepare:start -->`` and ``<!-- data_prepare:end -->``
(only that section is replaced; the file is created if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_section

ROOT = Path(__file__).resolve().parents[1]
MODS = ("t1", "t1ce", "t2", "flair")


def _smooth_volume(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int = 8) -> np.ndarray:
    """Random but smooth: coarse Gaussian noise, separably linearly interpolated up to ``shape``."""
    small = rng.standard_normal((coarse, coarse, coarse)).astype(np.float32)
    out = small
    for axis, n in enumerate(shape):
        src = np.linspace(0, coarse - 1, n)
        j0 = np.floor(src).astype(int)
        j1 = np.minimum(j0 + 1, coarse - 1)
        f = (src - j0).astype(np.float32)
        a = np.take(out, j0, axis=axis)
        b = np.take(out, j1, axis=axis)
        shp = [1, 1, 1]
        shp[axis] = n
        out = a * (1 - f.reshape(shp)) + b * f.reshape(shp)
    return out


def generate(out: Path, cases: int, shape=(240, 240, 155), seed: int = 0) -> Path:
    """Write ``cases`` BraTS-style case folders of float32 .nii.gz (brain ellipsoid, zero background, seg)."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    X, Y, Z = shape
    x, y, z = np.meshgrid(np.linspace(-1, 1, X), np.linspace(-1, 1, Y), np.linspace(-1, 1, Z), indexing="ij", sparse=True)
    brain = (x / 0.75) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2 < 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for c in range(cases):
        case = f"BraTS2021_{c:05d}"
        d = out / case
        if (d / f"{case}_seg.nii.gz").exists():
            continue
        d.mkdir(exist_ok=True)
        rng = np.random.default_rng([seed, c])
        tumour = ((x - rng.uniform(-0.3, 0.3)) ** 2 + (y - rng.uniform(-0.3, 0.3)) ** 2 + (z - rng.uniform(-0.3, 0.3)) ** 2) < rng.uniform(0.01, 0.04)
        tumour = tumour & brain
        for m in MODS:
            v = 500 + 200 * _smooth_volume(rng, shape) + 300 * tumour
            v = np.where(brain, np.maximum(v, 1.0), 0.0).astype(np.float32)
            nib.save(nib.Nifti1Image(v, affine), str(d / f"{case}_{m}.nii.gz"))
        nib.save(nib.Nifti1Image(tumour.astype(np.uint8), affine), str(d / f"{case}_seg.nii.gz"))
    return out


def _child(mode: str, data: str, cache: str, size: int) -> None:
    """Run one measured step in this (fresh) process and print a JSON line."""
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    if mode == "nibabel":
        import nibabel as nib

        files = sorted(Path(data).rglob("*.nii.gz"))
        for f in files:
            nib.load(str(f)).get_fdata(dtype=np.float32)
        extra = {"files": len(files)}
    else:
        from medcfx.data import PreprocessConfig, prepare

        ss = prepare(data, PreprocessConfig(size=size), cache_dir=cache)
        extra = {"slices": len(ss), "cases": len(ss.cases)}
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(), **extra}))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: VmHWM from /proc (Linux), else ru_maxrss.

    ru_maxrss is not used first because Linux carries the parent's high-water mark across fork/exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _run_child(mode: str, data: Path, cache: Path, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--cache", str(cache), "--size", str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} step failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    """The fastest of repeated runs (least disturbed by other load on a shared machine)."""
    return min(runs, key=lambda r: r["seconds"])


def update_docs(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_section(path, "data_prepare", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=50, help="synthetic cases to generate (default 50)")
    ap.add_argument("--data", type=Path, default=None, help="use this BraTS folder instead of synthetic data")
    ap.add_argument("--work", type=Path, default=None, help="where synthetic data is written (kept for reuse)")
    ap.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="repeat both timed steps, report the fastest (default 1)")
    ap.add_argument("--shape", type=str, default="240,240,155", help="synthetic volume shape X,Y,Z")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--child", choices=("nibabel", "prepare"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, str(args.data), str(args.cache), args.size)
        return

    tmp = Path(tempfile.mkdtemp(prefix="medcfx-bench-"))
    try:
        if args.data is None:
            shape = tuple(int(s) for s in args.shape.split(","))
            work = args.work or (tmp / "data")
            t0 = time.perf_counter()
            data = generate(work, args.cases, shape)
            print(f"generated {args.cases} cases of 4 x {'x'.join(map(str, shape))} in {time.perf_counter() - t0:.1f} s at {data}")
            source = f"synthetic: {args.cases} cases of 4 x {' x '.join(map(str, shape))} float32 .nii.gz + seg"
            reproduce = f"python benchmarks/data_prepare.py --cases {args.cases}" + (f" --shape {args.shape}" if args.shape != "240,240,155" else "")
        else:
            data = args.data
            source = f"{data}"
            reproduce = f"python benchmarks/data_prepare.py --data {data}"
        if args.size != 64:
            reproduce += f" --size {args.size}"
        if args.repeat != 1:
            reproduce += f" --repeat {args.repeat}"
        cache = tmp / "cache"
        nib_runs, cold_runs = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same background load
            nib_runs.append(_run_child("nibabel", data, cache, args.size))
            shutil.rmtree(cache, ignore_errors=True)
            cold_runs.append(_run_child("prepare", data, cache, args.size))
        warm = _run_child("prepare", data, cache, args.size)
        nib_res, cold = _best(nib_runs), _best(cold_runs)
    finally:
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        if args.data is None and args.work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    ratio = cold["seconds"] / nib_res["seconds"]
    cpu_ratio = cold["cpu_seconds"] / nib_res["cpu_seconds"]
    cases = cold["cases"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## Data preparation (`benchmarks/data_prepare.py`)",
        "",
        f"Data: {source}. Output size {args.size}. Machine: {platform.machine()}, {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}, numpy {np.__version__}.",
        "",
        "| step | wall s | CPU s | cases/s | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
        f"| nibabel load only (`get_fdata`, {nib_res['files']} files) | {nib_res['seconds']:.1f} | {nib_res['cpu_seconds']:.1f} | {cases / nib_res['seconds']:.2f} | {nib_res['peak_rss_mb']:.0f} |",
        f"| `prepare()` cold cache ({cold['slices']} slices) | {cold['seconds']:.1f} | {cold['cpu_seconds']:.1f} | {cases / cold['seconds']:.2f} | {cold['peak_rss_mb']:.0f} |",
        f"| `prepare()` cache hit | {warm['seconds']:.2f} | {warm['cpu_seconds']:.2f} | - | {warm['peak_rss_mb']:.0f} |",
        "",
        f"prepare / nibabel-alone: **{ratio:.2f}x** wall time, **{cpu_ratio:.2f}x** CPU time (target <= 2x); "
        f"fastest of {args.repeat} interleaved run(s); load average {load:.1f} at the end "
        "(on a shared machine, CPU time is the steadier number).",
        "",
        f"Reproduce: `{reproduce}`",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        update_docs(text, args.docs)
        print(f"updated {args.docs}")


if __name__ == "__main__":
    main()
