#!/usr/bin/env python
"""Whole-volume explain: one BraTS-sized case (240 x 240 x 155, 4 contrasts) through `medcfx explain`, end to
end, with the paper's loop and with the fast sampler (medcfx's default), and peak RSS flat in the slice count.

    python benchmarks/volume.py [--model sanchez-demo] [--batch 8]

Runs `medcfx bench MODEL --volume` (medcfx.bench_volume: a real explain subprocess per sampler, wall time and
the OS's peak RSS) on a synthetic BraTS-sized case, then the fast sampler again on the same case cut to half
its slices (the peak RSS must not grow with the slice count). Writes the "volume" section of
docs/benchmarks.md. Time it on a quiet machine: every row is wall clock.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sanchez-demo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    from rich.console import Console

    from medcfx.bench_volume import BRATS_SHAPE, bench_volume, settings_text, synthetic_volume
    from medcfx.cli_models import get_registry

    console = Console()
    reg = get_registry()
    with tempfile.TemporaryDirectory() as tmp:
        full = synthetic_volume(Path(tmp) / "full")
        half = synthetic_volume(Path(tmp) / "half", shape=(*BRATS_SHAPE[:2], BRATS_SHAPE[2] // 2))
        rows = bench_volume(reg, args.model, full, ["paper", "fast"], args.batch, console)
        rows += bench_volume(reg, args.model, half, ["fast"], args.batch, console)
    if args.no_docs:
        return
    lines = ["| case | sampler | settings | s / volume | sampled slices | s / sampled slice | peak RSS | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    base = rows[0]["seconds"]
    for r in rows:
        settings = settings_text(r["params"])
        shape = " x ".join(map(str, r["volume_shape"]))
        lines.append(f"| {shape} | {r['sampler']} | {settings} | {r['seconds']:.1f} | {r['sampled_slices']} | "
                     f"{r['seconds_per_sampled_slice']:.2f} | {r['peak_rss_mib']:.0f} MiB | "
                     f"{base / r['seconds'] * r['sampled_slices'] / rows[0]['sampled_slices']:.2f}x |")
    cmd = "python benchmarks/volume.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = f"""<!-- volume:start -->
## Whole-volume explain (`benchmarks/volume.py`)

`medcfx explain` of one synthetic BraTS-sized case ({' x '.join(map(str, BRATS_SHAPE))} voxels of 1 mm, 4 contrasts,
one tumour; `medcfx data demo brain` anatomy) with `{args.model}`, batch {args.batch}, end to end in a
subprocess (reading, preprocessing, sampling every slice with foreground, writing the volumes, panels and
provenance); slices without foreground are not sampled. Speed-up: per sampled slice, against the paper's loop
on the full case. Peak RSS: the operating system's maximum resident set size of the explain process.
Machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, quiet.

{chr(10).join(lines)}

Reproduce: `{cmd}` (or `medcfx bench {args.model} --volume` for the first two rows).
<!-- volume:end -->"""
    bench = ROOT / "docs" / "benchmarks.md"
    text = bench.read_text()
    a, b = "<!-- volume:start -->", "<!-- volume:end -->"
    text = (text[: text.index(a)] + section + text[text.index(b) + len(b):]) if a in text else \
        text.rstrip() + "\n\n" + section + "\n"
    bench.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
