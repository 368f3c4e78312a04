"""Structural similarity (SSIM) of image batches, the one implementation the plugins share.

SSIM (Wang, Bovik, Sheikh and Simoncelli 2004, "Image quality assessment: from error visibility to
structural similarity", IEEE TIP 13(4)) of images x, y, one channel at a time, with a Gaussian window w:

    mu_x = w * x,  mu_y = w * y,  s_xx = w * x^2 - mu_x^2,  s_yy = w * y^2 - mu_y^2,  s_xy = w * (x y) - mu_x mu_y
    SSIM = (2 mu_x mu_y + C1) (2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (s_xx + s_yy + C2))
    C1 = (K1 L)^2,  C2 = (K2 L)^2,  K1 = 0.01, K2 = 0.03 (the paper's constants),  L = the data range

Window: w = g g^T with g_i = exp(-d_i^2 / (2 sigma^2)), d_i = i - (size - 1) / 2, normalised to sum 1;
11 x 11 with sigma 1.5 (the paper's) by default. ``*`` is a per-channel correlation; the moments
are population moments (no N / (N - 1) correction). Two border rules:

* ``padding="reflect"``: the image is reflected without repeating the edge pixel ("d c b | a b c d"), so the
  map has the image's size (restoration's anomaly maps). Needs an odd window and sides > size // 2.
* ``padding="valid"``: only the positions where the window fits inside the image (the paper's mean SSIM;
  mediffusion's autoencoder loss and reconstruction SSIM). :func:`ssim` shrinks the window to the image's
  smaller side when the image is smaller than the window.

Everything is computed in the inputs' dtype and device and is differentiable (torch autograd).
Callers choose L: 2 for medcfx's model range [-1, 1], 1 for images in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medcfx.errors import UsageError

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
PADDINGS = ("reflect", "valid")

__all__ = ["WINDOW", "SIGMA", "K1", "K2", "gaussian_window", "ssim_map", "ssim"]


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float64) -> torch.Tensor:
    """1D Gaussian weights exp(-d^2 / (2 sigma^2)), d = i - (size - 1) / 2 for i = 0 .. size - 1, summing to 1."""
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(d ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def _filter(x: torch.Tensor, g: torch.Tensor, padding: str) -> torch.Tensor:
    """Per-channel correlation of x [B, C, H, W] with g g^T, g float64 on the CPU (``reflect``: same
    size; ``valid``: shrunk).

    float64 runs as two 1D passes, other dtypes as one 2D kernel: the same sums up to round-off, and the
    faster of the two for each. Measured on 2 CPU threads (torch 2.13), [32, 1, 64, 64] 11x11: float32 2D
    14 ms vs separable 31 ms (oneDNN); float64 2D 53 ms vs separable 17 ms ([16, 2, 128, 128]: 261 vs 113 ms).
    """
    c = x.shape[1]
    pad = g.numel() // 2
    if padding == "reflect":
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    if x.dtype != torch.float64:
        k = (g[:, None] * g[None, :]).to(x.device, x.dtype)  # cast before the move: MPS has no float64
        return F.conv2d(x, k.expand(c, 1, -1, -1), groups=c)
    g = g.to(x.device)
    x = F.conv2d(x, g.reshape(1, 1, -1, 1).expand(c, 1, -1, -1), groups=c)
    return F.conv2d(x, g.reshape(1, 1, 1, -1).expand(c, 1, -1, -1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int = WINDOW, sigma: float = SIGMA,
             padding: str = "reflect", k1: float = K1, k2: float = K2) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of x and y [B, C, H, W] (see the module docstring), in their dtype.

    Returns [B, C, H, W] for ``padding="reflect"``, [B, C, H - window + 1, W - window + 1] for ``"valid"``.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise UsageError(f"ssim_map needs two [B, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if padding not in PADDINGS:
        raise UsageError(f"ssim_map: padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    if window < 1:
        raise UsageError(f"ssim_map: the window must have at least one pixel, got {window}")
    if padding == "reflect" and window % 2 == 0:
        raise UsageError(f"ssim_map: reflect padding needs an odd window, got {window}")
    if padding == "reflect" and min(x.shape[-2:]) <= window // 2:
        raise UsageError(f"ssim_map: images of {tuple(x.shape[-2:])} are too small for a {window}x{window} window")
    if padding == "valid" and min(x.shape[-2:]) < window:
        raise UsageError(f"ssim_map: images of {tuple(x.shape[-2:])} are smaller than a {window}x{window} window")
    g = gaussian_window(window, sigma)
    mx, my = _filter(x, g, padding), _filter(y, g, padding)
    sxx = _filter(x * x, g, padding) - mx * mx
    syy = _filter(y * y, g, padding) - my * my
    sxy = _filter(x * y, g, padding) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = WINDOW,
         sigma: float = SIGMA) -> torch.Tensor:
    """Mean SSIM per sample [B]: the ``valid`` map averaged over channels and positions (the paper's MSSIM).

    The window shrinks to min(window, H, W) for images smaller than it. ``data_range`` L: 2 for [-1, 1].
    """
    window = min(window, a.shape[-1], a.shape[-2])
    return ssim_map(a, b, data_range, window, sigma, padding="valid").flatten(1).mean(1)
