"""Training of the restoration model (and of the unconditional reconstruction baseline).

Restoration (Baugh et al. 2024, sec. 2): healthy slices x0 only. Each training sample is corrupted by one of
the fold's three training tasks (:mod:`medcfx.anomalies`), except a share ``no_task_prob`` (20%) that stays
clean (x~0 = x0); the UNet sees cat([x_t, x~0]) (``cond_image``) and regresses the noise of x_t = sqrt(abar_t)
x0 + sqrt(1 - abar_t) eps, so it learns to denoise towards the HEALTHY x0:

    L = E_t,eps [ w(t) || eps - eps_theta(x_t, t, x~0) ||^2 ],   w(t) = min(SNR(t), gamma) / SNR(t)

with SNR(t) = abar_t / (1 - abar_t) (min-SNR weighting, gamma = ``loss.snr_gamma``; 0 turns it off) and
eps optionally shifted by ``loss.noise_offset`` times one N(0, 1) value per sample and channel (both from the
authors' code). Every random draw of a sample (task or none, task parameters, source image, t, eps) comes from
the training loop's per-sample generators, so runs are reproducible and resumable.

Validation: ``val_cases`` of the healthy cases are held out; ``val_slices`` of their slices, each corrupted
by one of the fold's two VALIDATION tasks (alternating; fixed seeds), with fixed timesteps spread over
[0, T) and fixed noise, give a deterministic validation loss (same weighting, no noise offset). The EMA
weights with the lowest validation loss are the ones registered (``fit``'s "best" checkpoint).

Reconstruction baseline (``recon-ddpm``): the same UNet without the image slot, trained on the same healthy
slices with no corruption (validation: the plain loss on the held-out slices).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from medcfx.anomalies import AnomalyConfig, fold_tasks, invert_contrast, synthesize
from medcfx.data.preprocess import PreprocessConfig, prepare
from medcfx.diffusion import Schedule
from medcfx.errors import MedcfxError, UsageError
from medcfx.nn import UNet
from medcfx.train import TrainConfig, fit, generator, start_run, uniform_batches

from .config import network_config


def split_cases(cases: list[str], fraction: float, seed: int) -> tuple[set, set]:
    """Hold out round(fraction * n) of the cases (at least one when there are two or more)."""
    cases = sorted(cases)
    if len(cases) < 2 or fraction <= 0:
        return set(cases), set()
    n_val = min(len(cases) - 1, max(1, int(round(fraction * len(cases)))))
    perm = np.random.default_rng(seed).permutation(len(cases))
    val = {cases[i] for i in perm[:n_val]}
    return set(cases) - val, val


def healthy_slices(request):
    """The prepared dataset and the rows of its healthy (label 0) slices, split into training / validation
    by case."""
    cfg = request.config
    pre = PreprocessConfig.from_dict(cfg["preprocess"])
    ss = prepare(request.data, pre, progress=request.console is not None)
    labels = ss.labels[:, 0] if ss.labels.shape[1] else np.full(len(ss), np.nan)
    healthy = labels == 0
    if not healthy.any():
        raise MedcfxError(f"{request.data}: no healthy slices (label 0); give BraTS cases (slices without tumour "
                          f"voxels are used) or an image folder with normal/")
    ids = ss.case_ids
    train_cases, val_cases = split_cases(sorted(set(ids[healthy].tolist())), float(cfg["val_cases"]), request.seed)
    train_rows = np.flatnonzero(healthy & np.isin(ids, list(train_cases)))
    val_rows = np.flatnonzero(healthy & np.isin(ids, list(val_cases)))
    return ss, train_rows, val_rows


def _as_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """[N, C', S, S] -> [N, channels, S, S]: unchanged when C' matches, else the channel mean repeated."""
    if images.shape[1] == channels:
        return images
    return np.repeat(images.mean(axis=1, keepdims=True), channels, axis=1)


def foreign_images(request, channels: int) -> np.ndarray | None:
    """Slices of ``foreign.data`` (prepared like the training data, ``foreign.modalities`` if given) for the
    inter-dataset blending task, or None (then the training images with inverted contrast are used)."""
    f = request.config["foreign"]
    if not f.get("data"):
        return None
    path = Path(f["data"])
    if not path.exists():
        raise UsageError(f"foreign.data {path}: no such file or folder")
    pre = dict(request.config["preprocess"])
    if f.get("modalities"):
        pre["modalities"] = f["modalities"]
    ss = prepare(path, PreprocessConfig.from_dict(pre), progress=request.console is not None)
    if len(ss) == 0:
        raise MedcfxError(f"foreign.data {path}: no slices")
    return _as_channels(np.asarray(ss.images[:]), channels)


class Corruptor:
    """Corrupted copies of training images: ``__call__(i, task, seed) -> x~0`` for training row i."""

    def __init__(self, images: np.ndarray, acfg: AnomalyConfig, foreign: np.ndarray | None):
        self.images = images
        self.acfg = acfg
        self.foreign = foreign

    def __call__(self, i: int, task: str, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        n = len(self.images)
        source = None
        if task == "intra_blend":
            j = int(rng.integers(max(n - 1, 1)))
            source = self.images[j + (j >= i) if n > 1 else i]
        elif task == "inter_blend":
            if self.foreign is not None:
                source = self.foreign[int(rng.integers(len(self.foreign)))]
            else:
                source = invert_contrast(self.images[int(rng.integers(n))], self.acfg.value_range)
        return synthesize(self.images[i], task, rng, source=source, config=self.acfg).image


def plan(batch, tasks: tuple[str, ...], p_none: float) -> list[tuple[str | None, int]]:
    """Per sample of a training batch: (task, seed), task None (no corruption) with probability ``p_none``,
    else one of ``tasks`` uniformly; drawn from the batch's per-sample generators."""
    none = batch.rand().reshape(-1) < p_none
    which = batch.randint(len(tasks)).reshape(-1)
    seeds = batch.randint(2 ** 62).reshape(-1)
    return [(None if skip else tasks[k], s) for skip, k, s in zip(none.tolist(), which.tolist(), seeds.tolist())]


def weighted_eps_loss(net, x0, cond: dict, t, noise, schedule, snr_gamma: float) -> torch.Tensor:
    """Mean over samples of w(t) * mean-squared error of the predicted noise (see the module docstring)."""
    x_t = schedule.q_sample(x0, t, noise)
    pred = net(x_t, t, **cond)
    mse = (pred.float() - noise.float()).pow(2).flatten(1).mean(1)
    if snr_gamma > 0:
        abar = schedule.alphas_cumprod[t.cpu()].to(mse.device, torch.float64)
        snr = abar / (1 - abar)
        mse = mse * (snr.clamp(max=snr_gamma) / snr).float()
    return mse.mean()


def _validation(ss, rows, corrupt, tasks, schedule, cfg, seed, device, conditional: bool):
    """A deterministic validation loss over fixed corrupted slices, timesteps and noise (or None)."""
    from medcfx.evaluation import select_rows

    n = int(cfg["val_slices"])
    if n <= 0 or len(rows) == 0:
        return None
    pick = select_rows(0, rows=rows, max_slices=n)
    x0 = np.asarray(ss.images[np.sort(pick)]).astype(np.float32)
    conds = []
    for k in range(len(x0)):
        if conditional:
            task = tasks[k % len(tasks)]
            rng = np.random.default_rng([seed, 7919, k])
            src = None
            if task == "intra_blend":
                src = x0[(k + 1) % len(x0)]
            elif task == "inter_blend":
                src = corrupt.foreign[k % len(corrupt.foreign)] if corrupt.foreign is not None else \
                    invert_contrast(x0[(k + 1) % len(x0)], corrupt.acfg.value_range)
            conds.append(synthesize(x0[k], task, rng, source=src, config=corrupt.acfg).image)
    x0t = torch.from_numpy(x0)
    cond_t = torch.from_numpy(np.stack(conds)).float() if conditional else None
    T = schedule.T
    t = torch.tensor([min(T - 1, int((k + 0.5) * T / len(x0))) for k in range(len(x0))], dtype=torch.int64)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(seed, 104729, k)) for k in range(len(x0))])
    gamma = float(cfg["loss"]["snr_gamma"])

    @torch.no_grad()
    def val_fn(model) -> float:
        total = 0.0
        for s in range(0, len(x0t), 32):
            sl = slice(s, s + 32)
            cond = {"cond_image": cond_t[sl].to(device)} if conditional else {}
            loss = weighted_eps_loss(model, x0t[sl].to(device), cond, t[sl].to(device), noise[sl].to(device),
                                     schedule, gamma)
            total += float(loss) * len(x0t[sl])
        return total / len(x0t)

    return val_fn


def train_model(request, conditional: bool) -> dict:
    """Train the restoration model (``conditional``) or the unconditional baseline; returns what the trainer
    needs to register the result."""
    cfg = request.config
    fold, train_tasks, val_tasks, p_none, acfg = None, (), (), 1.0, AnomalyConfig()
    if conditional:
        fold = int(request.options.get("fold") if request.options.get("fold") is not None else cfg["fold"])
        train_tasks, val_tasks = fold_tasks(fold)
        p_none = float(cfg["no_task_prob"])
        if not 0 <= p_none <= 1:
            raise UsageError(f"no_task_prob must be in [0, 1], got {p_none}")
        acfg = AnomalyConfig.from_dict(cfg["anomalies"])
    ss, train_rows, val_rows = healthy_slices(request)
    channels = len(ss.channels) or int(np.asarray(ss.images[:1]).shape[1])
    images = np.ascontiguousarray(np.asarray(ss.images[train_rows]), dtype=np.float32)
    net_cfg = network_config(cfg, channels, conditional)
    torch.manual_seed(request.seed)
    model = UNet(net_cfg)
    schedule = Schedule.create(cfg["diffusion"]["schedule"], cfg["diffusion"]["T"])
    corrupt = Corruptor(images, acfg, foreign_images(request, channels) if conditional else None)
    x_all = torch.from_numpy(images)
    gamma, offset = float(cfg["loss"]["snr_gamma"]), float(cfg["loss"]["noise_offset"])

    def loss_fn(net, batch):
        idx = batch.indices
        x0 = x_all[idx].to(batch.device)
        cond = {}
        n_corrupted = 0
        if conditional:
            out = []
            for i, (task, s) in zip(idx.tolist(), plan(batch, train_tasks, p_none)):
                out.append(images[i] if task is None else corrupt(i, task, s))
                n_corrupted += task is not None
            cond["cond_image"] = torch.from_numpy(np.stack(out)).to(batch.device)
        t = batch.randint(schedule.T).reshape(-1).to(batch.device)
        noise = batch.randn(*x0.shape[1:])
        if offset:
            noise = noise + offset * batch.randn(x0.shape[1], 1, 1)
        loss = weighted_eps_loss(net, x0, cond, t, noise.to(batch.device), schedule, gamma)
        return loss, ({"corrupted": n_corrupted / len(idx)} if conditional else {})

    val_fn = _validation(ss, val_rows, corrupt, val_tasks, schedule, cfg, request.seed, request.device, conditional)
    run = start_run(request, Path(request.data).name)
    result = fit(model, loss_fn, uniform_batches(len(images)), TrainConfig.from_dict(cfg["train"]), run,
                 seed=request.seed, device=request.device, resume=request.resume, val_fn=val_fn,
                 progress=request.console is not None)
    selected = "final"
    best = run / "checkpoints" / "best" / "ema.safetensors" if run is not None else None
    if best is not None and result.val and best.exists():
        result.ema.load_state_dict(load_file(str(best)))
        selected = "best"
    return {"result": result, "run": run, "net_cfg": net_cfg, "fold": fold, "train_tasks": train_tasks,
            "val_tasks": val_tasks, "train_slices": int(len(train_rows)), "val_slices": int(len(val_rows)),
            "selected": selected}
