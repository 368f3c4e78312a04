"""Anomaly maps of the restoration method: 1 - local SSIM (Wang et al. 2004), or the absolute residual.

Local SSIM of images x, y (one channel) with a Gaussian window w (11 x 11, sigma 1.5, normalised to sum 1):

    mu_x = w * x,  mu_y = w * y,  s_xx = w * x^2 - mu_x^2,  s_yy = w * y^2 - mu_y^2,  s_xy = w * (x y) - mu_x mu_y
    SSIM = (2 mu_x mu_y + C1) (2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (s_xx + s_yy + C2))
    C1 = (0.01 L)^2,  C2 = (0.03 L)^2,  L = the data range of the images (2 for medcfx's [-1, 1])

``*`` is a 2D convolution with reflect padding (the edge pixel is not repeated: "d c b | a b c d"), so the
map has the image's size. The population moments are used (no N / (N - 1) correction). The authors' code
(torchgeometry's SSIM with ``max_val=255`` on [-1, 1] images) uses constants for a range of 255 and zero
padding; medcfx uses the range the images actually have.

Anomaly map (Baugh et al. 2024): the channel mean of 1 - SSIM(restoration, input), set to 0 in the background
(pixels where no channel exceeds that channel's minimum over the image). ``residual`` is the channel mean of |x - restoration|
with the same background rule (the classical reconstruction-error map, for comparison).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medcfx.errors import UsageError

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 2.0  # medcfx model space is [-1, 1]
MAP_KINDS = ("ssim", "residual")


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float64) -> torch.Tensor:
    """1D Gaussian weights exp(-d^2 / (2 sigma^2)), d = -(size // 2) .. size // 2, normalised to sum 1."""
    d = torch.arange(size, dtype=dtype) - size // 2
    g = torch.exp(-(d ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of x [B, C, H, W] with reflect padding."""
    c = x.shape[1]
    pad = g.numel() // 2
    kh = g.to(x.dtype).reshape(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kw = g.to(x.dtype).reshape(1, 1, 1, -1).repeat(c, 1, 1, 1)
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), kh, groups=c)
    return F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kw, groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE, window: int = WINDOW,
             sigma: float = SIGMA) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of x and y [B, C, H, W] (computed in float64): [B, C, H, W]."""
    if x.shape != y.shape or x.dim() != 4:
        raise UsageError(f"ssim_map needs two [B, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) <= window // 2:
        raise UsageError(f"ssim_map: images of {tuple(x.shape[-2:])} are too small for a {window}x{window} window")
    g = gaussian_window(window, sigma)
    x64, y64 = x.double(), y.double()
    mx, my = _blur(x64, g), _blur(y64, g)
    sxx = _blur(x64 * x64, g) - mx * mx
    syy = _blur(y64 * y64, g) - my * my
    sxy = _blur(x64 * y64, g) - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


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
