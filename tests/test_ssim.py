"""medcfx.ssim: the one SSIM implementation the restoration and mediffusion plugins share.

Independent reference: SSIM at every position by explicit loops over its 11 x 11 window (numpy, float64,
moments around the window mean), for both border rules; the plugins are checked to use this module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcfx import ssim as core
from medcfx.errors import UsageError


def window_loops(x: np.ndarray, y: np.ndarray, L: float, padding: str, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """SSIM of two 2D arrays at every window position, by loops (reflect: the map has the image's size)."""
    d = np.arange(size) - (size - 1) / 2
    g = np.exp(-d ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    if padding == "reflect":
        x, y = np.pad(x, size // 2, mode="reflect"), np.pad(y, size // 2, mode="reflect")
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    out = np.zeros((x.shape[0] - size + 1, x.shape[1] - size + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            sxx, syy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            sxy = (w * (px - mx) * (py - my)).sum()
            out[i, j] = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return out


def pair(seed: int, shape, lo: float = -1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, 1, shape)
    return x, np.clip(x + rng.normal(0, 0.3, shape), lo, 1)


@pytest.mark.parametrize("padding", ["reflect", "valid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_map_matches_an_explicit_window_loop(padding, dtype):
    x, y = pair(0, (2, 2, 14, 13))
    got = core.ssim_map(torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype), 2.0, padding=padding)
    assert got.dtype == dtype
    assert got.shape == ((2, 2, 14, 13) if padding == "reflect" else (2, 2, 4, 3))
    ref = np.stack([np.stack([window_loops(x[b, c], y[b, c], 2.0, padding) for c in range(2)]) for b in range(2)])
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-12 if dtype == torch.float64 else 2e-5)


def test_mean_ssim_is_the_valid_map_averaged_and_shrinks_its_window_to_small_images():
    x, y = pair(1, (3, 2, 14, 13), lo=0.0)
    got = core.ssim(torch.from_numpy(x), torch.from_numpy(y), data_range=1.0).numpy()
    ref = [np.mean([window_loops(x[b, c], y[b, c], 1.0, "valid") for c in range(2)]) for b in range(3)]
    np.testing.assert_allclose(got, ref, atol=1e-12)
    # an image smaller than the window: the window becomes min(H, W) (here 8, an even, centred window)
    small_x, small_y = x[:, :, :8, :9], y[:, :, :8, :9]
    got = core.ssim(torch.from_numpy(small_x), torch.from_numpy(small_y), data_range=1.0).numpy()
    ref = [np.mean([window_loops(small_x[b, c], small_y[b, c], 1.0, "valid", size=8) for c in range(2)]) for b in range(3)]
    np.testing.assert_allclose(got, ref, atol=1e-12)
    same = torch.from_numpy(x)
    np.testing.assert_allclose(core.ssim(same, same, data_range=1.0).numpy(), 1.0, atol=1e-12)


def test_constants_scale_with_the_data_range_and_the_loss_is_differentiable():
    x, y = pair(2, (1, 1, 16, 16))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).requires_grad_(True)
    narrow = core.ssim(xt, yt, data_range=2.0)
    wide = core.ssim(xt, yt, data_range=255.0)
    assert float(wide.detach()) > float(narrow.detach()) + 0.05  # larger C1, C2 pull SSIM towards 1
    (1 - narrow).sum().backward()
    assert yt.grad is not None and torch.isfinite(yt.grad).all() and yt.grad.abs().sum() > 0


def test_bad_inputs_are_usage_errors():
    a = torch.zeros(1, 1, 8, 8)
    with pytest.raises(UsageError, match="one shape"):
        core.ssim_map(a, torch.zeros(1, 1, 8, 9), 2.0)
    with pytest.raises(UsageError, match="too small"):
        core.ssim_map(torch.zeros(1, 1, 5, 9), torch.zeros(1, 1, 5, 9), 2.0)
    with pytest.raises(UsageError, match="odd window"):
        core.ssim_map(a, a, 2.0, window=4)
    with pytest.raises(UsageError, match="padding"):
        core.ssim_map(a, a, 2.0, padding="zeros")


def test_both_plugins_use_the_core_implementation():
    from medcfx_mediffusion import autoencoder
    from medcfx_restoration import maps

    assert autoencoder.ssim is core.ssim
    x, y = (torch.from_numpy(v) for v in pair(3, (1, 2, 20, 20)))
    assert torch.equal(maps.ssim_map(x, y), core.ssim_map(x, y, maps.DATA_RANGE, padding="reflect"))
