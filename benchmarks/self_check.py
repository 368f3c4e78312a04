"""The inversion self-check errors of a sanchez model on demo brains: the numbers behind its limit.

For each case, 6 slices spread evenly: mean |x - reconstruction| in [0, 1] intensity units, where the
reconstruction is the counterfactual's encode followed by an unguided decode (the null label), at the model's
sampling settings (``--steps`` to override). docs/operating-points.md quotes a run of::

    python benchmarks/self_check.py models/demo-inputs/brain/demo_case T              # the fast sampler
    python benchmarks/self_check.py models/demo-inputs/brain/demo_case T --sampler paper  # 100 DDIM steps
    python benchmarks/self_check.py models/demo-inputs/brain/demo_case --sampler paper --steps 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from medcfx.cli_models import get_registry  # noqa: E402
from medcfx.data.preprocess import PreprocessConfig  # noqa: E402
from medcfx.inputs import iter_cases  # noqa: E402
from medcfx.method import Request  # noqa: E402
from medcfx.plugins import get_plugins  # noqa: E402
from medcfx_sanchez.methods import Mapper, self_check_limit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+", type=Path, help="case folders or datasets")
    ap.add_argument("--model", default="sanchez-demo")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", default=None, choices=("fast", "paper"), help="default: the method's (fast)")
    ap.add_argument("--slices", type=int, default=6)
    args = ap.parse_args()
    reg, m = get_registry(), get_plugins().method("sanchez")
    entry = reg.resolve(args.model)
    options = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler)) if v}
    req = Request(command="explain", method=m, options=options, model=entry.ref, registry=reg, device="cpu",
                  config={k: v for k, v in m.defaults.items() if k != "presets"}, extra={})
    mapper = Mapper("sanchez", req, entry)
    cfg = PreprocessConfig.from_dict(entry.config["preprocess"])
    worst = []
    for path in args.data:
        for case in iter_cases(path, cfg, mapper.channels):
            with torch.no_grad():
                check = mapper.self_check(case, args.slices, batch_size=8)
            worst.append(max(check["mean_abs_error"]))
            print(f"{case.id}: slices {check['slices']} errors {np.round(check['mean_abs_error'], 4).tolist()}")
    print(f"{entry.ref}, {mapper.params}: per-slice errors up to {max(worst):.4f}; limit {self_check_limit(mapper.params)}")


if __name__ == "__main__":
    main()
