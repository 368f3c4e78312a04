"""TorchDenoiser: the torch implementation of the denoiser contract."""

import numpy as np
import torch

from medcfx.diffusion import TorchDenoiser


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.emb = torch.nn.Embedding(3, 2)

    def forward(self, x, t, y=None, cond_image=None):
        h = self.conv(x if cond_image is None else x + cond_image)
        h = h + (t.to(h.dtype) / 1000).reshape(-1, 1, 1, 1)
        if y is not None:
            h = h + self.emb(y)[:, :, None, None]
        return h


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 5, 5, generator=g)
    return x, torch.tensor([10, 900]), {"y": torch.tensor([0, 2]), "cond_image": torch.randn(2, 2, 5, 5, generator=g)}


def test_matches_module_and_passes_cond_as_keywords():
    net = TinyNet()
    x, t, cond = _inputs()
    out = TorchDenoiser(net)(x, t, cond)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, net(x, t, **cond))
    torch.testing.assert_close(TorchDenoiser(net)(x, t, {}), net(x, t))
    assert not out.requires_grad  # parameters require grad, but the call ran under no_grad


def test_gradients_flow_when_the_input_requires_them():
    net = TinyNet()
    x, t, cond = _inputs()
    xg = x.clone().requires_grad_(True)
    out = TorchDenoiser(net)(xg, t, cond)
    assert out.requires_grad
    (g,) = torch.autograd.grad(out.sum(), xg)
    assert g.abs().sum() > 0
    with torch.no_grad():
        assert not TorchDenoiser(net)(xg, t, cond).requires_grad


def test_bf16_autocast_returns_float32_close_to_full_precision():
    net = TinyNet()
    x, t, cond = _inputs()
    out = TorchDenoiser(net, autocast_bf16=True)(x, t, cond)
    assert out.dtype == torch.float32
    ref = net(x, t, **cond).detach()
    # bf16 has an 8-bit mantissa: relative error ~ 2^-8 per operation
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=3e-2, atol=3e-2)
    assert not torch.equal(out, ref)  # it really ran in reduced precision


def test_float64_state_drives_a_float32_module():
    net = TinyNet()
    x, t, cond = _inputs()
    out = TorchDenoiser(net)(x.double(), t, {**cond, "cond_image": cond["cond_image"].double()})
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), net(x, t, **cond).detach().numpy(), rtol=1e-6, atol=1e-6)
