"""Training for the sanchez plugin: the CFG diffusion model and the baselines' networks.

- ``sanchez``: conditional UNet on all slices, class-balanced batches, labels healthy (0) / unhealthy (1),
  35% of each batch's labels replaced by the null label (classifier-free training).
- ``cdpm-healthy``: the same UNet without a label, trained on healthy slices only.
- ``cdpm-classifier``: an unconditional UNet on all slices plus a noise-aware classifier of x_t
  (cross-entropy on healthy/unhealthy at uniformly drawn timesteps), as in Wolleb et al. 2022.

Held-out validation cases (``val_cases``) are kept out of training and scored after it with the explain
defaults; those metrics go into the registry entry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medcfx.data.preprocess import PreprocessConfig, prepare
from medcfx.diffusion import Schedule
from medcfx.diffusion.losses import eps_loss
from medcfx.errors import MedcfxError
from medcfx.nn import UNet
from medcfx.train import TrainConfig, balanced_batches, fit, start_run, uniform_batches

from .counterfactual import HEALTHY
from .networks import NoisyClassifier, network_config


def split_cases(case_ids: np.ndarray, fraction: float, seed: int, lesion_cases=None) -> tuple[set, set]:
    """Hold out ``fraction`` of the cases (at least one when there are two or more) for validation.

    ``lesion_cases``: the cases with a lesion. When given, the split is stratified by lesion presence: each
    group (with lesion / without) gives round(fraction * its size) cases, at least one from a group of two or
    more, so validation metrics always have lesion and healthy cases when the data has both."""
    cases = sorted(set(case_ids.tolist()))
    if len(cases) < 2 or fraction <= 0:
        return set(cases), set()
    rng = np.random.default_rng(seed)
    if lesion_cases is None:
        groups = [cases]
    else:
        sick = set(lesion_cases)
        groups = [g for g in ([c for c in cases if c in sick], [c for c in cases if c not in sick]) if g]
    val: set = set()
    for group in groups:
        n_val = max(1, int(round(fraction * len(group)))) if len(group) >= 2 or len(groups) == 1 else 0
        n_val = min(n_val, len(group) - 1) if len(groups) > 1 else n_val
        perm = rng.permutation(len(group))
        val |= {group[i] for i in perm[:n_val]}
    if not val:  # every group had one case: hold out one anyway
        val = {cases[int(rng.integers(len(cases)))]}
    return set(cases) - val, val


def drop_labels(y: torch.Tensor, u: torch.Tensor, p: float, null: int) -> torch.Tensor:
    """Classifier-free training: replace the labels whose uniform draw ``u`` is below ``p`` by ``null``."""
    return torch.where(u < p, torch.full_like(y, null), y)


def load_training_slices(request):
    cfg = request.config
    pre = PreprocessConfig.from_dict(cfg["preprocess"])
    ss = prepare(request.data, pre, progress=request.console is not None)
    labels = ss.labels[:, 0]
    known = ~np.isnan(labels)
    if not known.any():
        raise MedcfxError(f"{request.data}: no slice labels (BraTS needs a _seg per case; image folders normal/ and abnormal/)")
    lesion_cases = set(ss.case_ids[known & (labels == 1)].tolist())
    train_cases, val_cases = split_cases(ss.case_ids, cfg["val_cases"], request.seed, lesion_cases=lesion_cases)
    in_train = np.isin(ss.case_ids, list(train_cases)) & known
    in_val = np.isin(ss.case_ids, list(val_cases)) & known
    return ss, np.flatnonzero(in_train), np.flatnonzero(in_val)


def _to_tensor(ss, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(ss.images[rows]))


def train_diffusion(request, kind: str) -> dict:
    """kind: 'sanchez' (CFG on all slices), 'healthy' (unconditional, healthy slices), 'full' (unconditional)."""
    cfg = request.config
    ss, train_rows, val_rows = load_training_slices(request)
    labels = ss.labels[:, 0]
    if kind == "healthy":
        train_rows = train_rows[labels[train_rows] == HEALTHY]
    if len(train_rows) == 0:
        raise MedcfxError(f"{request.data}: no training slices for {request.method.name}")
    if ss.channels and len(ss.channels) != cfg["network"]["in_channels"]:
        raise MedcfxError(f"{request.data}: {len(ss.channels)} channels ({', '.join(ss.channels)}) but the network "
                          f"expects {cfg['network']['in_channels']} (set network.in_channels/out_channels)")
    net_cfg = network_config(cfg, unconditional=kind != "sanchez")
    torch.manual_seed(request.seed)
    model = UNet(net_cfg)
    schedule = Schedule.create(cfg["diffusion"]["schedule"], cfg["diffusion"]["T"])
    x_all = _to_tensor(ss, train_rows)
    y_all = torch.from_numpy(labels[train_rows].astype(np.int64))
    null = model.null_label
    p_drop = float(cfg["cfg_dropout"])

    def loss_fn(net, batch):
        x0 = x_all[batch.indices].to(batch.device)
        cond = {}
        if kind == "sanchez":
            cond["y"] = drop_labels(y_all[batch.indices].to(batch.device), batch.rand().reshape(-1), p_drop, null)
        return eps_loss(net, x0, schedule, batch, cond), {}

    draw = balanced_batches(y_all.numpy()) if kind == "sanchez" else uniform_batches(len(train_rows))
    run = start_run(request, Path(request.data).name)
    tcfg = TrainConfig.from_dict(cfg["train"])
    result = fit(model, loss_fn, draw, tcfg, run, seed=request.seed, device=request.device, resume=request.resume,
                 progress=request.console is not None)
    return {"ss": ss, "val_rows": val_rows, "result": result, "run": run, "net_cfg": net_cfg,
            "train_slices": int(len(train_rows))}


def train_classifier(request, ss, run_dir: Path | None) -> tuple[NoisyClassifier, object]:
    """The noise-aware classifier of the CDPM + classifier baseline, trained on the same training cases."""
    cfg = request.config
    _, train_rows, _ = load_training_slices(request)
    labels = torch.from_numpy(ss.labels[train_rows, 0].astype(np.int64))
    x_all = _to_tensor(ss, train_rows)
    schedule = Schedule.create(cfg["diffusion"]["schedule"], cfg["diffusion"]["T"])
    torch.manual_seed(request.seed + 1)
    clf = NoisyClassifier(cfg["classifier"])

    def loss_fn(net, batch):
        x0 = x_all[batch.indices].to(batch.device)
        t = batch.randint(schedule.T).reshape(-1)
        x_t = schedule.q_sample(x0, t, batch.randn(*x0.shape[1:]))
        logits = net(x_t, t)
        y = labels[batch.indices].to(batch.device)
        acc = (logits.argmax(1) == y).float().mean()
        return torch.nn.functional.cross_entropy(logits, y), {"acc": float(acc)}

    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    resume = request.resume and run_dir is not None and (run_dir / "checkpoints" / "latest").exists()
    result = fit(clf, loss_fn, balanced_batches(labels.numpy()), TrainConfig.from_dict(cfg["train"]), run_dir,
                 seed=request.seed + 1, device=request.device, resume=resume, progress=request.console is not None)
    return result.ema, result


def saved_config(request, net_cfg: dict, extra: dict | None = None) -> dict:
    cfg = request.config
    return {"network": net_cfg, "diffusion": cfg["diffusion"], "preprocess": cfg["preprocess"],
            "explain": cfg["explain"], "conditioning": cfg["conditioning"], "cfg_dropout": cfg["cfg_dropout"],
            "train": cfg["train"], **(extra or {})}

