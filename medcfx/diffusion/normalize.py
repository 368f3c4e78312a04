"""Processing of the model's x0 estimate (an ``X0Process`` is a callable x0_hat -> x0_hat).

Samplers apply the process to x0_hat = predict_x0(x_k, eps, abar_k) and then re-derive eps from the
processed x0 (see ``ddim.predict_eps``).

- ``static_clip``: x0 = clamp(x0, -1, 1) (the data range after medcfx preprocessing).
- ``dynamic_normalise(p, per_channel)`` (dynamic thresholding, Saharia et al. 2022; used at every encode
  and decode step by Sanchez et al. 2022): per sample (and channel, by default)
      s = max(1, quantile_p(|x0|)),   x0 = clamp(x0, -s, s) / s.
  Values inside [-1, 1] are untouched when fewer than (1 - p) of them lie outside; otherwise the estimate
  is shrunk back into [-1, 1].

The quantile is the linear-interpolation quantile of ``numpy.quantile`` / ``torch.quantile`` (position
p * (n - 1) among the sorted values), computed with two ``torch.kthvalue`` calls over the flattened spatial
dimensions: vectorised over batch and channels and without ``torch.quantile``'s 2**24-element limit.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from medcfx.errors import UsageError

__all__ = ["static_clip", "dynamic_normalise", "dynamic_threshold_values"]


def static_clip(x0: torch.Tensor) -> torch.Tensor:
    """clamp(x0, -1, 1)."""
    return x0.clamp(-1.0, 1.0)


def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 < p <= 1.0:
        raise UsageError(f"dynamic normalisation percentile {p!r} must be a fraction in (0, 1], e.g. 0.99")
    return p


def dynamic_threshold_values(x0: torch.Tensor, p: float = 0.99, per_channel: bool = True) -> torch.Tensor:
    """s = max(1, quantile_p(|x0|)) per sample and channel ([B, C, 1, ...]) or per sample ([B, 1, 1, ...]).

    x0 has shape [B, C, *spatial]; the result has x0's number of dimensions so it broadcasts against x0.
    """
    p = _check_p(p)
    if x0.dim() < 2:
        raise UsageError(f"dynamic normalisation needs a batch [B, C, ...], got shape {tuple(x0.shape)}")
    work = x0.detach().abs()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    rows = work.flatten(2) if per_channel else work.flatten(1).unsqueeze(1)  # [B, C or 1, n]
    n = rows.shape[-1]
    pos = p * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = rows.kthvalue(lo + 1, dim=-1).values
    v_hi = rows.kthvalue(hi + 1, dim=-1).values if hi != lo else v_lo
    q = v_lo + frac * (v_hi - v_lo)
    s = q.clamp(min=1.0)
    return s.reshape(*s.shape, *([1] * (x0.dim() - 2))).to(x0.dtype)


def dynamic_normalise(percentile: float = 0.99, per_channel: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """An X0Process: x0 -> clamp(x0, -s, s) / s with s = dynamic_threshold_values(x0, percentile, per_channel)."""
    p = _check_p(percentile)

    def process(x0: torch.Tensor) -> torch.Tensor:
        s = dynamic_threshold_values(x0, p, per_channel)
        return torch.maximum(torch.minimum(x0, s), -s) / s

    process.__name__ = f"dynamic_normalise(p={p}, per_channel={per_channel})"
    return process
