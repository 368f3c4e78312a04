"""Anomaly maps of the restoration method: 1 - local SSIM (Wang et al. 2004), or the absolute residual.

Local SSIM is :func:`medcfx.ssim.ssim_map` (the implementation shared with the other plugins) with this
method's numbers: a Gaussian window of 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2,
C2 = (K2 L)^2 with L = 2 (the data range of medcfx's [-1, 1]), reflect padding (the edge pixel is not
repeated: "d c b | a b c d", so the map has the image's size), computed in float64. The authors' code
(torchgeometry's SSIM with ``max_val=255`` on [-1, 1] images) uses constants for a range of 255 and zero
padding; medcfx uses the range the images actually have.

Anomaly map (Baugh et al. 2024): the channel mean of 1 - SSIM(restoration, input), set to 0 in the background
(pixels where no channel exceeds that channel's minimum over the image). ``residual`` is the channel mean of |x - restoration|
with the same background rule (the classical reconstruction-error map, for comparison).
"""

from __future__ import annotations

import torch

from medcfx import ssim as _ssim
from medcfx.errors import UsageError
from medcfx.ssim import SIGMA, WINDOW

DATA_RANGE = 2.0  # medcfx model space is [-1, 1]
MAP_KINDS = ("ssim", "residual")


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE, window: int = WINDOW,
             sigma: float = SIGMA) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of x and y [B, C, H, W], reflect padding, computed in float64: [B, C, H, W]."""
    return _ssim.ssim_map(x.double(), y.double(), data_range, window, sigma, padding="reflect")


def foreground(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool: some channel exceeds that channel's minimum over the image (the rule of
    :func:`medcfx.anomalies.foreground`; the background of skull-stripped MRI is excluded)."""
    return (x > x.amin(dim=(2, 3), keepdim=True)).any(dim=1)


def anomaly_map(x: torch.Tensor, restored: torch.Tensor, kind: str = "ssim",
                data_range: float = DATA_RANGE) -> torch.Tensor:
    """[B, H, W] float32: channel mean of 1 - SSIM (or of |x - restored|), zero in x's background."""
    if kind == "ssim":
        m = (1.0 - ssim_map(restored, x, data_range)).mean(dim=1)
    elif kind == "residual":
        m = (x.double() - restored.double()).abs().mean(dim=1)
    else:
        raise UsageError(f"--map must be one of {', '.join(MAP_KINDS)}, got {kind!r}")
    return torch.where(foreground(x), m, torch.zeros_like(m)).float()
