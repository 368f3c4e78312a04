#!/usr/bin/env python
"""Peak memory of the streamed pixel metrics on a BraTS-sized test set (about 6e8 pixels).

    python benchmarks/metrics_memory.py [--slices 36000] [--size 128] [--batch 64]

Streams synthetic heatmaps and masks (batch by batch, as `medcfx evaluate` does) through
medcfx.metrics.PixelMetrics and reports pixels, seconds and peak RSS; writes the "metrics_memory" section of
docs/benchmarks.md.
"""

import argparse
import resource
import time
from pathlib import Path

import numpy as np
from common import write_section

from medcfx.metrics import PixelMetrics

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=36000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pm = PixelMetrics()
    t0 = time.perf_counter()
    yy, xx = np.mgrid[: args.size, : args.size]
    for start in range(0, args.slices, args.batch):
        b = min(args.batch, args.slices - start)
        cy, cx = rng.integers(20, args.size - 20, (2, b, 1, 1))
        masks = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(0, 15, (b, 1, 1)) ** 2
        maps = rng.random((b, args.size, args.size), dtype=np.float32) * 0.5 + masks * 0.4
        pm.update(maps, masks)
    r = pm.compute()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = (f"{r['pixels']:.3g} pixels ({args.slices} slices of {args.size}x{args.size}) streamed in {secs:.0f} s; "
            f"peak RSS {rss:.0f} MB (target < 1 GB); AUPRC {r['pixel_AUPRC']:.3f}, ideal Dice {r['pixel_ideal_Dice']:.3f}")
    print(line)
    section = (f"## Streamed pixel metrics on a BraTS-sized test set\n\n{line}.\n\n"
               f"Reproduce: `python benchmarks/metrics_memory.py --slices {args.slices} --size {args.size}`\n")
    write_section(ROOT / "docs" / "benchmarks.md", "metrics_memory", section)


if __name__ == "__main__":
    main()
