"""The joint diffusion classifier (Kaleta et al. 2025, sec. 3.3; Deja et al. 2023).

One latent UNet is both the denoiser eps_theta(z_t, t) and the feature extractor of the classifier: the
UNet's feature tap (``UNet.forward_features``: the last encoder feature map of every resolution level and
the middle-block output) is average-pooled to ``pool x pool`` per map, flattened and concatenated into
H_t, and a small MLP g_omega (Linear, LeakyReLU(0.2), Linear) maps H_t to one logit per finding.

Loss for a batch (``joint_loss``):
    L = w_diff * mean_{diffusion rows} ||eps - eps_theta(z_t, t)||^2 + lambda(step) * L_class,
    L_class over the labelled entries only (NaN label = unlabelled, masked element-wise):
      multi-label: BCE with logits and pos_weight p_k = n_neg_k / n_pos_k (counted on the labelled
                   training rows):  l = -[p_k y log s(x) + (1 - y) log(1 - s(x))], averaged over the
                   labelled (row, finding) entries;
      single-label: softmax cross-entropy over the rows whose labels are complete (one-hot).
    lambda(step) = lambda for step >= cls_start, else 0 (classification switched on after a warm-up).
Batches hold ``diffusion_batch`` rows drawn uniformly from all images (labelled or not; the diffusion loss
uses only these) followed by ``class_batch`` rows drawn from the labelled images (the paper trains with
64 diffusion and 32 classification samples per step); every labelled row of the batch enters L_class.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medcfx.errors import MedcfxError, UsageError
from medcfx.nn import UNet
from medcfx.nn.blocks import timestep_embedding


def encoder_features(unet: UNet, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """The feats of ``unet.forward_features(x, t)`` (encoder levels + middle block) without running the
    decoder: the classifier needs only these, so prediction and guidance gradients skip half the network.
    Only for UNets without label / image / semantic conditioning (mediffusion's)."""
    cfg = unet.config
    dtype = unet.time_embed[0].weight.dtype
    emb = unet.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype))
    _, _, feats = unet.encoder(x.to(dtype), emb, None, None)
    return feats


def choose_pool(channels: list[int], resolutions: list[int], max_features: int) -> int:
    """The largest p in {1, 2, 4, ...}, p <= the smallest feature resolution, with sum_l C_l p^2 <=
    ``max_features`` (the paper caps the pooled feature vector at 10,000 values); at least 1."""
    p = 1
    while p * 2 <= min(resolutions) and sum(channels) * (p * 2) ** 2 <= max_features:
        p *= 2
    return p


def pool_features(feats: list[torch.Tensor], pool: int) -> torch.Tensor:
    """Average-pool every map to pool x pool, flatten and concatenate: [B, sum_l C_l pool^2]."""
    return torch.cat([F.adaptive_avg_pool2d(f.float(), pool).flatten(1) for f in feats], dim=1)


class Head(nn.Module):
    """g_omega: Linear(F, hidden) - LeakyReLU(0.2) - [Dropout] - Linear(hidden, K)."""

    def __init__(self, in_features: int, hidden: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_outputs))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class JointModel(nn.Module):
    """forward(z_t, t) -> (eps, logits): one UNet pass gives the noise prediction and the classifier's
    features. ``logits(z_t, t)`` runs only the encoder half (for prediction and guidance)."""

    def __init__(self, unet: UNet, head: Head, pool: int) -> None:
        super().__init__()
        self.unet = unet
        self.head = head
        self.pool = int(pool)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor):
        eps, feats = self.unet.forward_features(z_t, t)
        return eps, self.head(pool_features(feats, self.pool))

    def logits(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(pool_features(encoder_features(self.unet, z_t, t), self.pool))


def build_joint(network: dict, classifier: dict, num_outputs: int) -> JointModel:
    """UNet from ``network`` and the head from ``classifier`` (hidden, dropout, pool)."""
    unet = UNet.from_config(network)
    feats = sum(c * classifier["pool"] ** 2 for c in unet.feature_channels())
    head = Head(feats, int(classifier["hidden"]), num_outputs, float(classifier.get("dropout", 0.0)))
    return JointModel(unet, head, classifier["pool"])


# ---------------------------------------------------------------------------------------------- losses


def pos_weights(labels: np.ndarray) -> np.ndarray:
    """p_k = (#labelled negatives) / (#labelled positives) per column (1 when a column has no positive or no
    negative); NaN entries do not count."""
    lab = np.asarray(labels, dtype=np.float64)
    pos = np.sum(lab == 1, axis=0)
    neg = np.sum(lab == 0, axis=0)
    return np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0).astype(np.float32)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits (with ``pos_weight``) over the entries whose label is not NaN; 0 (with a graph)
    when no entry is labelled."""
    mask = ~torch.isnan(labels)
    y = torch.where(mask, labels, torch.zeros_like(labels))
    per = F.binary_cross_entropy_with_logits(logits.float(), y.float(), pos_weight=pos_weight.float(), reduction="none")
    n = mask.sum()
    return (per * mask).sum() / n.clamp(min=1)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the rows whose one-hot labels are complete (no NaN); target =
    argmax of the row. 0 (with a graph) when no row is complete."""
    rows = ~torch.isnan(labels).any(dim=1)
    target = torch.nan_to_num(labels).argmax(dim=1)
    per = F.cross_entropy(logits.float(), target, reduction="none")
    return (per * rows).sum() / rows.sum().clamp(min=1)


def class_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    if kind == "bce":
        return masked_bce(logits, labels, pos_weight)
    if kind == "ce":
        return masked_ce(logits, labels)
    raise UsageError(f"classifier.loss must be bce or ce, got {kind!r}")


def probabilities(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Per-finding probabilities: sigmoid (multi-label) or softmax (single-label)."""
    return torch.sigmoid(logits) if kind == "bce" else torch.softmax(logits, dim=1)


@torch.no_grad()
def classify(model, z: torch.Tensor, kind: str, t: int = 0, batch: int = 128) -> np.ndarray:
    """Per-finding probabilities of latents z at timestep t (default 0: clean latents)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(z), batch):
        zb = z[i:i + batch].to(dev)
        tt = torch.full((len(zb),), int(t), dtype=torch.int64, device=dev)
        out.append(probabilities(kind, model.logits(zb, tt)).cpu())
    return torch.cat(out).numpy()


def loss_kind(labels: np.ndarray, setting: str) -> str:
    """'bce' or 'ce' for ``classifier.loss`` = bce | ce | auto. auto picks softmax cross-entropy when there
    are >= 2 columns and every labelled row is complete and one-hot (mutually exclusive classes, e.g. a
    multi-class .npz), else multi-label BCE."""
    if setting in ("bce", "ce"):
        return setting
    if setting != "auto":
        raise UsageError(f"classifier.loss must be auto, bce or ce, got {setting!r}")
    lab = np.asarray(labels, dtype=np.float64)
    rows = lab[~np.isnan(lab).all(axis=1)]
    if lab.shape[1] >= 2 and len(rows) and not np.isnan(rows).any() and np.all(rows.sum(axis=1) == 1):
        return "ce"
    return "bce"


# ------------------------------------------------------------------------------------- label subsampling


def subsample_labels(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Keep the labels of round(fraction * n) of the n labelled rows (rows with at least one label); the
    other rows become unlabelled (NaN). Rows are ranked by one fixed random permutation of the labelled rows
    (numpy PCG64 seeded by ``seed``) and the first ones kept, so the result is reproducible and nested: the
    rows kept at 2% are among those kept at 5%. At least one row is kept when fraction > 0."""
    lab = np.array(labels, dtype=np.float32, copy=True)
    f = float(fraction)
    if not 0.0 < f <= 1.0 or math.isnan(f):
        raise UsageError(f"--label-fraction must be in (0, 1], got {fraction!r}")
    labelled = np.flatnonzero(~np.isnan(lab).all(axis=1))
    if len(labelled) == 0:
        raise MedcfxError("the training data has no labelled image (labels.csv cells are all empty)")
    order = labelled[np.random.Generator(np.random.PCG64(seed)).permutation(len(labelled))]
    keep = max(1, int(round(f * len(labelled))))
    lab[order[keep:]] = np.nan
    return lab


# --------------------------------------------------------------------------------------------- batches


def joint_batches(n_images: int, labelled: np.ndarray, diffusion_batch: int, class_batch: int):
    """draw(seed, step, batch) -> indices: ``diffusion_batch`` uniform over all images, then ``class_batch``
    uniform over the ``labelled`` row indices (both with replacement, seeded by (seed, step))."""
    from medcfx.train import generator

    labelled = torch.as_tensor(np.asarray(labelled), dtype=torch.int64)
    if n_images < 1:
        raise MedcfxError("the training set is empty")
    if class_batch and len(labelled) == 0:
        raise MedcfxError("no labelled image to train the classifier on")

    def draw(seed: int, step: int, batch_size: int) -> torch.Tensor:
        assert batch_size == diffusion_batch + class_batch
        g = generator(seed, step, 0)
        d = torch.randint(n_images, (diffusion_batch,), generator=g)
        c = labelled[torch.randint(len(labelled), (class_batch,), generator=g)] if class_batch else d[:0]
        return torch.cat([d, c])

    return draw


def joint_loss(net, batch, latents: torch.Tensor, labels: torch.Tensor, schedule, opts: dict):
    """The training loss of one batch (see the module docstring). ``opts``: diffusion_batch,
    diffusion_weight, lambda, cls_start, cls_t_max, kind, pos_weight (tensor)."""
    z0 = latents[batch.indices].to(batch.device)
    y = labels[batch.indices].to(batch.device)
    is_diff = batch.positions.to(batch.device) < opts["diffusion_batch"]
    t_all = batch.randint(schedule.T).reshape(-1)
    t_cls = batch.randint(opts["cls_t_max"]).reshape(-1)
    t = torch.where(is_diff, t_all, t_cls).to(batch.device)
    noise = batch.randn(*z0.shape[1:]).to(z0)
    z_t = schedule.q_sample(z0, t, noise)
    if opts["diffusion_weight"] == 0 and not isinstance(net, nn.parallel.DistributedDataParallel):
        # classifier only (the "UNet w/o diffusion" baseline): skip the decoder pass (under DDP the full
        # forward runs, so that DDP's gradient synchronisation sees it)
        logits = net.logits(z_t, t)
        diff = torch.zeros((), device=z0.device)
    else:
        eps, logits = net(z_t, t)
        per = (eps.float() - noise).pow(2).flatten(1).mean(1)
        diff = (per * is_diff).sum() / is_diff.sum().clamp(min=1)
    lam = opts["lambda"] if batch.step >= opts["cls_start"] else 0.0
    cls = class_loss(opts["kind"], logits, y, opts["pos_weight"].to(batch.device))
    loss = opts["diffusion_weight"] * diff + lam * cls
    return loss, {"diffusion": diff.detach(), "classification": cls.detach()}
