#!/usr/bin/env python
"""How good is the noise-aware classifier of the CDPM + classifier baseline at the noise levels that its
guidance uses? Held-out slice accuracy and AUROC of a registered cdpm-classifier model at several timesteps.

    python benchmarks/sanchez_classifier.py --model bench-cdpm-classifier-s0 --data /work/demo-data/brain-test
    # the same diffusion model with its classifier retrained for longer, registered as a new model:
    python benchmarks/sanchez_classifier.py --model bench-cdpm-classifier-s0 --data /work/demo-data/brain-test \
        --retrain 6000 --train /work/demo-data/brain-train --name bench-cdpm-classifier-long-s0

Guidance acts during decoding from level L = 75% of the respaced steps (model timesteps up to ~750) down to 0;
a classifier that is near chance over most of that range cannot steer the decode towards "healthy".
Prints one JSON line per timestep (accuracy, AUROC against scikit-learn's roc_auc_score, slices).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))


def main() -> None:
    from sklearn.metrics import roc_auc_score

    from medcfx.data import PreprocessConfig, prepare
    from medcfx.diffusion import Schedule
    from medcfx.loading import load_state
    from medcfx.registry import Registry
    from medcfx_sanchez.networks import NoisyClassifier

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--timesteps", default="0,100,250,400,550,750")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", type=int, default=0, help="train a new classifier for this many steps first")
    ap.add_argument("--train", type=Path, default=None, help="training data of --retrain")
    ap.add_argument("--name", default=None, help="registry name of the model with the retrained classifier")
    args = ap.parse_args()

    reg = Registry()
    entry = reg.resolve(args.model)
    if args.retrain:
        entry = retrain(reg, entry, args)
    clf = NoisyClassifier(entry.config["classifier"])
    load_state(clf, reg.load_tensors(entry, "classifier"), f"{entry.ref} (classifier)")
    clf.eval()
    ss = prepare(args.data, PreprocessConfig.from_dict(entry.config["preprocess"]))
    y = ss.labels[:, 0]
    rows = np.flatnonzero(~np.isnan(y))
    x0 = torch.from_numpy(np.ascontiguousarray(ss.images[rows]))
    y = y[rows].astype(np.int64)
    d = entry.config["diffusion"]
    sched = Schedule.create(d["schedule"], int(d["T"]))
    g = torch.Generator().manual_seed(args.seed)
    for t in [int(v) for v in args.timesteps.split(",")]:
        tt = torch.full((len(x0),), t, dtype=torch.int64)
        with torch.no_grad():
            xt = sched.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
            logits = torch.cat([clf(xt[i:i + 64], tt[i:i + 64]) for i in range(0, len(xt), 64)])
        p = torch.softmax(logits.double(), 1)[:, 1].numpy()
        print(json.dumps({"model": entry.ref, "t": t, "accuracy": float(((p > 0.5) == y).mean()),
                          "AUROC": float(roc_auc_score(y, p)), "slices": int(len(y)),
                          "unhealthy_share": float(y.mean())}), flush=True)


def retrain(reg, entry, args):
    """Train the entry's classifier config again for ``args.retrain`` steps (same data split, loss and
    balanced batches as ``medcfx train cdpm-classifier``) and register the diffusion weights with it."""
    import copy
    import time
    from types import SimpleNamespace

    from medcfx.train import _state_tensors
    from medcfx_sanchez.networks import DEFAULTS
    from medcfx_sanchez.train import load_training_slices, train_classifier
    from safetensors.torch import save_file

    if args.train is None or args.name is None:
        sys.exit("--retrain needs --train and --name")
    cfg = copy.deepcopy(entry.config)
    cfg["train"] = {**cfg["train"], "steps": args.retrain}
    cfg.setdefault("val_cases", DEFAULTS["val_cases"])
    run = Path(f"runs/classifier-{args.name}")
    request = SimpleNamespace(config=cfg, data=args.train, seed=int(entry.provenance.get("seed", 0)),
                              resume=False, device="cpu", console=None)
    ss, _, _ = load_training_slices(request)
    t0 = time.time()
    clf, result = train_classifier(request, ss, run)
    path = run / "classifier.safetensors"
    save_file(_state_tensors(clf), str(path))
    prov = {**entry.provenance, "classifier_steps": args.retrain, "classifier_from": entry.ref,
            "classifier_seconds": round(time.time() - t0, 1)}
    new = reg.register(args.name, entry.method, {"weights": reg.artifact_path(entry, "weights"), "classifier": path},
                       config=entry.config, provenance=prov, metrics={"classifier_final_loss": result.final_loss})
    print(json.dumps({"registered": new.ref, "classifier_steps": args.retrain, "seconds": prov["classifier_seconds"]}),
          flush=True)
    return new


if __name__ == "__main__":
    main()
