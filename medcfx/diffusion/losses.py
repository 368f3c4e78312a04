"""Training losses.

Epsilon prediction (Ho et al. 2020, eq. 14): draw t ~ U{0..T-1} and eps ~ N(0, I) per sample, form
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and regress the network output onto eps:

    L = E || eps - eps_theta(x_t, t, c) ||^2      (mean over pixels and samples)

The draws come from the training loop's per-sample generators (``medcfx.train.Batch``), so a run is
reproducible across process counts and resumes.
"""

from __future__ import annotations

import torch


def eps_loss(model, x0: torch.Tensor, schedule, batch, cond: dict | None = None, reduce: bool = True):
    """Epsilon-prediction MSE for ``model(x_t, t, **cond)``; returns the mean loss (or per-sample losses)."""
    t = batch.randint(schedule.T).reshape(-1).to(x0.device)
    noise = batch.randn(*x0.shape[1:]).to(x0.device, x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    pred = model(x_t, t, **(cond or {}))
    per_sample = (pred.float() - noise).pow(2).flatten(1).mean(1)
    return per_sample.mean() if reduce else per_sample
