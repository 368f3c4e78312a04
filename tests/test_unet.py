"""Tests of the UNet (medcfx.nn.unet), its blocks and the FLOP counter, on tiny networks.

Zero-initialised output layers make a fresh UNet output exactly 0, so every test that checks that an input
matters first perturbs all weights (``perturb_``).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from medcfx.errors import UsageError
from medcfx.nn import HalfUNetConfig, HalfUNetEncoder, UNet, UNetConfig, UNetForExport, count_flops
from medcfx.nn.blocks import AttentionBlock, ResBlock, timestep_embedding

TINY = dict(
    in_channels=2,
    out_channels=2,
    image_size=16,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(16, 8),
    num_head_channels=8,
    num_groups=8,
)
ALL_SLOTS = dict(
    TINY,
    num_classes=3,
    attention_conditioning=True,
    label_token_dim=8,
    label_tokens=3,
    cond_image_channels=1,
    z_sem_dim=5,
)


def perturb_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Add scale * N(0, 1) noise to every parameter (fixed seed), so zero-initialised layers become live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def make(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return perturb_(UNet(UNetConfig(**{**ALL_SLOTS, **overrides})), seed=seed).eval()


def inputs(model: UNet, batch: int = 2, seed: int = 1) -> dict:
    names, values = model.onnx_inputs(batch)
    g = torch.Generator().manual_seed(seed)
    out = dict(zip(names, values))
    out["x"] = torch.randn(out["x"].shape, generator=g)
    return out


def differs(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return float((a - b).abs().max()) > tol


# ----------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"resblock_updown": False, "use_scale_shift_norm": False},
        {"num_head_channels": 0, "num_heads": 2, "channel_mult": (1, 2, 2), "attention_resolutions": (8,)},
    ],
)
def test_output_shape_and_zero_at_init(overrides):
    cfg = UNetConfig(**{**ALL_SLOTS, **overrides})
    model = UNet(cfg).eval()
    kw = inputs(model, batch=3)
    with torch.no_grad():
        eps = model(**kw)
    assert eps.shape == (3, cfg.out_channels, 16, 16) and eps.dtype == torch.float32
    assert torch.count_nonzero(eps) == 0  # zero-initialised output conv
    perturb_(model)
    with torch.no_grad():
        eps = model(**kw)
        # a larger input than image_size also works (fully convolutional)
        big = {**kw, "x": torch.randn(3, 2, 32, 32), "cond_image": torch.randn(3, 1, 32, 32)}
        eps_big = model(**big)
    assert torch.isfinite(eps).all() and float(eps.abs().max()) > 1e-3
    assert eps_big.shape == (3, 2, 32, 32)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    dim = 10
    emb = timestep_embedding(t, dim).numpy()
    half = dim // 2
    for row, tv in zip(emb, t.tolist()):
        for i in range(half):
            f = 10000.0 ** (-i / half)
            assert row[i] == pytest.approx(math.cos(tv * f), abs=1e-4)
            assert row[half + i] == pytest.approx(math.sin(tv * f), abs=1e-4)
    assert timestep_embedding(t, 7).shape == (4, 7)
    assert torch.all(timestep_embedding(t, 7)[:, -1] == 0)


# ------------------------------------------------------------------------------------------ conditioning


def test_every_slot_changes_the_output():
    model = make()
    kw = inputs(model)
    with torch.no_grad():
        base = model(**kw)
        changes = {
            "t": {**kw, "t": kw["t"] + 100},
            "y class": {**kw, "y": (kw["y"] + 1) % 3},
            "y null": {**kw, "y": torch.full_like(kw["y"], model.null_label)},
            "cond_image": {**kw, "cond_image": kw["cond_image"] + 0.5},
            "z_sem": {**kw, "z_sem": kw["z_sem"] + 0.5},
            "x": {**kw, "x": kw["x"] + 0.5},
        }
        for name, changed in changes.items():
            assert differs(model(**changed), base), name


def test_samples_in_a_batch_are_independent():
    model = make()
    kw = inputs(model, batch=2)
    with torch.no_grad():
        base = model(**kw)
        other = {k: v.clone() for k, v in kw.items()}
        other["y"][1] = model.null_label
        other["z_sem"][1] += 1.0
        other["x"][1] += 1.0
        out = model(**other)
    assert torch.equal(out[0], base[0])
    assert differs(out[1], base[1])


@pytest.mark.parametrize("time_add,attn", [(True, True), (True, False), (False, True)])
def test_null_label_is_a_zero_embedding(time_add, attn):
    """Independent check: zero the embedding tables by hand and feed class 0; that must give exactly the
    null-label output (the null label is a zero embedding in both the time add and the attention tokens)."""
    model = make(label_in_time_embedding=time_add, attention_conditioning=attn)
    assert model.null_label == 3
    kw = inputs(model)
    manual = make(label_in_time_embedding=time_add, attention_conditioning=attn)
    with torch.no_grad():
        for table in (manual.label_emb, manual.label_token_emb):
            if table is not None:
                table.weight.zero_()
        null_out = model(**{**kw, "y": torch.full_like(kw["y"], 3)})
        zeroed_out = manual(**{**kw, "y": torch.zeros_like(kw["y"])})
        class_out = model(**{**kw, "y": torch.zeros_like(kw["y"])})
    assert torch.equal(null_out, zeroed_out)
    assert differs(null_out, class_out)


def test_attention_conditioning_enters_keys_and_values():
    with_tokens = make(label_in_time_embedding=False)
    without = UNet(UNetConfig(**{**ALL_SLOTS, "label_in_time_embedding": True, "attention_conditioning": False}))
    result = without.load_state_dict(with_tokens.state_dict(), strict=False)
    assert result.missing_keys == ["label_emb.weight"]
    token_keys = [k for k in with_tokens.state_dict() if "token" in k]
    assert sorted(result.unexpected_keys) == sorted(token_keys)
    n_attention = sum(isinstance(m, AttentionBlock) for m in with_tokens.modules())
    assert len(token_keys) == 1 + 2 * n_attention  # the token table + a 1x1 conv (weight, bias) per layer
    with torch.no_grad():
        without.label_emb.weight.zero_()  # label absent from the time embedding in both models
        kw = inputs(with_tokens)
        assert differs(with_tokens(**kw), without.eval()(**kw))
        # label_in_time_embedding is off, so the label can only act through the attention tokens
        assert differs(with_tokens(**kw), with_tokens(**{**kw, "y": (kw["y"] + 1) % 3}))


def _manual_attention(block: AttentionBlock, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Plain float64 re-computation: GroupNorm, 1x1 projections, per-head softmax(q^T [k, k_c] / sqrt(d))
    over the concatenated sequence, output projection, residual."""
    x64, tok = x.double(), tokens.double()
    b, c, hh, ww = x.shape
    n = hh * ww
    groups = block.norm.num_groups
    xg = x64.reshape(b, groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)
    xn = ((xg - mean) / torch.sqrt(var + block.norm.eps)).reshape(b, c, n)
    xn = xn * block.norm.weight.double()[:, None] + block.norm.bias.double()[:, None]
    wqkv, bqkv = block.qkv.weight.double()[:, :, 0], block.qkv.bias.double()
    qkv = torch.einsum("oc,bcn->bon", wqkv, xn) + bqkv[:, None]
    q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
    wt, bt = block.token_kv.weight.double()[:, :, 0], block.token_kv.bias.double()
    kv_tok = torch.einsum("oc,bcn->bon", wt, tok) + bt[:, None]
    keys = torch.cat([k, kv_tok[:, :c]], dim=-1)
    values = torch.cat([v, kv_tok[:, c:]], dim=-1)
    d = c // block.num_heads
    out = torch.zeros(b, c, n, dtype=torch.float64)
    for bi in range(b):
        for head in range(block.num_heads):
            rows = slice(head * d, (head + 1) * d)
            scores = q[bi, rows].T @ keys[bi, rows] / math.sqrt(d)  # [N, N + n_tokens]
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            out[bi, rows] = (weights @ values[bi, rows].T).T
    wp, bp = block.proj_out.weight.double()[:, :, 0], block.proj_out.bias.double()
    proj = torch.einsum("oc,bcn->bon", wp, out) + bp[:, None]
    return x64 + proj.reshape(b, c, hh, ww)


def test_attention_layer_matches_manual_computation():
    model = make()
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert all(blk.token_kv is not None for blk in blocks)
    block = model.encoder.middle[1]
    assert isinstance(block, AttentionBlock) and block.num_heads == 32 // 8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 4, 4, generator=g)
    tokens = torch.randn(2, 8, 3, generator=g)
    with torch.no_grad():
        got = block(x, tokens).double()
        want = _manual_attention(block, x, tokens)
    assert float((got - want).abs().max()) < 1e-5
    assert differs(got, x.double())  # the attention branch is live


def test_resblock_matches_manual_computation():
    """h = GN(conv(SiLU(GN(x)))) * (1 + s) + b, then * (1 + Linear(z)), then zero-init conv; plus skip."""
    torch.manual_seed(0)
    block = perturb_(ResBlock(8, 16, emb_channels=12, dropout=0.0, num_groups=4, z_dim=5)).eval()
    g = torch.Generator().manual_seed(4)
    x, emb, z = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 12, generator=g), torch.randn(2, 5, generator=g)

    def gn(a, norm):
        ag = a.reshape(a.shape[0], norm.num_groups, -1)
        m = ag.mean(-1, keepdim=True)
        v = ag.var(-1, unbiased=False, keepdim=True)
        out = ((ag - m) / torch.sqrt(v + norm.eps)).reshape(a.shape)
        return out * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]

    def silu(a):
        return a / (1 + torch.exp(-a))

    with torch.no_grad():
        h = F.conv2d(silu(gn(x, block.in_norm)), block.in_conv.weight, block.in_conv.bias, padding=1)
        e = silu(emb) @ block.emb_proj.weight.T + block.emb_proj.bias
        scale, shift = e[:, :16, None, None], e[:, 16:, None, None]
        h = gn(h, block.out_norm) * (1 + scale) + shift
        h = h * (1 + (z @ block.z_proj.weight.T + block.z_proj.bias)[:, :, None, None])
        h = F.conv2d(silu(h), block.out_conv.weight, block.out_conv.bias, padding=1)
        want = F.conv2d(x, block.skip.weight, block.skip.bias) + h
        got = block(x, emb, z)
    assert float((got - want).abs().max()) < 1e-5


def test_every_parameter_gets_a_gradient():
    """Training mode (dropout on): no dead module, every parameter influences the loss."""
    model = make().train()
    kw = inputs(model, batch=4)
    kw["y"] = torch.tensor([0, 1, 2, 3])  # every class row and the null label
    model(**kw).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert dead == []


def test_low_precision():
    """bf16 weights (norms still computed in float32) and bf16 autocast both run and stay close to fp32."""
    model = make()
    kw = inputs(model)
    with torch.no_grad():
        ref = model(**kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(**kw)
        half = make().to(torch.bfloat16)(**kw)
    scale = float(ref.abs().max())
    for out in (auto, half):
        assert out.dtype == torch.float32
        assert float((out - ref).abs().max()) < 0.1 * scale


# ------------------------------------------------------------------------------------------ feature tap


def test_forward_features():
    model = make()
    kw = inputs(model)
    with torch.no_grad():
        eps, feats = model.forward_features(**kw)
        assert torch.equal(eps, model(**kw))
    assert len(feats) == len(model.config.channel_mult) + 1
    assert model.feature_channels() == [16, 32, 32]
    assert model.feature_resolutions() == [16, 8, 8]
    for f, ch, res in zip(feats, model.feature_channels(), model.feature_resolutions()):
        assert f.shape == (2, ch, res, res)
    # the features are intermediate maps, not copies of each other, and they depend on the label
    with torch.no_grad():
        _, feats_null = model.forward_features(**{**kw, "y": torch.full_like(kw["y"], 3)})
    assert differs(feats[-1], feats_null[-1])


def test_half_unet_encoder():
    cfg = HalfUNetConfig(in_channels=2, image_size=16, out_dim=7, model_channels=16, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(8,), num_head_channels=8, num_groups=8)
    torch.manual_seed(0)
    enc = perturb_(HalfUNetEncoder(cfg)).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 16, 16, generator=g)
    with torch.no_grad():
        z = enc(x)
        z_swapped = enc(x.flip(0))
        z_big = enc(torch.randn(2, 2, 32, 32, generator=g))
    assert z.shape == (3, 7) and z_big.shape == (2, 7)
    assert torch.allclose(z_swapped, z.flip(0), atol=1e-6)  # per-sample, no batch mixing
    assert differs(z[0], z[1])
    # no time embedding anywhere; same blocks as the UNet's encoder path
    assert not any(isinstance(m, ResBlock) and m.emb_proj is not None for m in enc.modules())
    assert HalfUNetEncoder.from_config(json.loads(json.dumps(cfg.to_dict()))).param_count() == enc.param_count()
    # it plugs into a z_sem UNet
    unet = make(z_sem_dim=7)
    kw = inputs(unet, batch=3)
    with torch.no_grad():
        assert unet(**{**kw, "z_sem": z}).shape == (3, 2, 16, 16)


# ---------------------------------------------------------------------------------------- config, errors


def test_config_roundtrip_and_safetensors(tmp_path):
    cfg = UNetConfig(**ALL_SLOTS)
    d = cfg.to_dict()
    text = json.dumps(d)
    (tmp_path / "unet.json").write_text(text)
    assert UNetConfig.from_dict(json.loads((tmp_path / "unet.json").read_text())) == cfg
    assert isinstance(d["channel_mult"], list)
    model = make()
    save_file(model.state_dict(), str(tmp_path / "unet.safetensors"))
    again = UNet.from_config(json.loads(text)).eval()
    again.load_state_dict(load_file(str(tmp_path / "unet.safetensors")))
    assert again.config == model.config
    kw = inputs(model)
    with torch.no_grad():
        assert torch.equal(again(**kw), model(**kw))


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ({"colour": 1}, "unknown key"),
        ({"num_groups": 5}, "num_groups 5"),
        ({"attention_resolutions": [4]}, "attention_resolutions [4]"),
        ({"num_classes": 0}, "attention_conditioning needs num_classes"),
        ({"image_size": 15}, "image_size 15"),
        ({"num_head_channels": 12}, "num_head_channels 12"),
        ({"num_heads": 2}, "exactly one"),
        ({"channel_mult": "12"}, "channel_mult"),
        ({"dropout": True}, "dropout"),
        ({"label_in_time_embedding": False, "attention_conditioning": False}, "enters nowhere"),
    ],
)
def test_config_errors(bad, fragment):
    with pytest.raises(UsageError) as info:
        UNetConfig.from_dict({**UNetConfig(**ALL_SLOTS).to_dict(), **bad})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_or_wrong_inputs_raise_value_error():
    model = make()
    kw = inputs(model)
    for name in ("y", "cond_image", "z_sem"):
        with pytest.raises(ValueError, match=name):
            model(**{**kw, name: None})
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        model(**{**kw, "y": torch.tensor([0, 4])})
    with pytest.raises(ValueError, match="z_sem"):
        model(**{**kw, "z_sem": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="t must"):
        model(**{**kw, "t": torch.zeros(3, dtype=torch.int64)})
    plain = UNet(UNetConfig(**TINY))
    with pytest.raises(ValueError, match="no y slot"):
        plain(torch.zeros(1, 2, 16, 16), torch.zeros(1, dtype=torch.int64), y=torch.zeros(1, dtype=torch.int64))
    assert plain.null_label is None
    assert plain.onnx_inputs(2)[0] == ["x", "t"]
    assert model.onnx_inputs(2)[0] == ["x", "t", "y", "cond_image", "z_sem"]


# -------------------------------------------------------------------------------------------------- ONNX


def _export(module: nn.Module, example: tuple, names: list[str], path) -> str:
    """Legacy TorchScript exporter (fast) with a dynamic batch axis; the dynamo exporter as fallback."""
    try:
        torch.onnx.export(
            module, example, str(path), input_names=names, output_names=["eps"], opset_version=17,
            dynamic_axes={n: {0: "batch"} for n in [*names, "eps"]}, dynamo=False,
        )
        return "torchscript"
    except Exception:  # pragma: no cover - only where the legacy exporter is gone
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            module, example, str(path), input_names=names, output_names=["eps"],
            dynamic_shapes=(tuple({0: batch} for _ in names),), dynamo=True,
        )
        return "dynamo"


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = make()
    wrapper = UNetForExport(model).eval()
    names, example = model.onnx_inputs(2)
    path = tmp_path / "unet.onnx"
    start = time.perf_counter()
    exporter = _export(wrapper, example, names, path)
    elapsed = time.perf_counter() - start
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names
    for batch in (1, 3):
        names_b, values = model.onnx_inputs(batch)
        values = list(values)
        values[0] = torch.randn(values[0].shape, generator=torch.Generator().manual_seed(batch))
        if batch == 3:
            values[2] = torch.tensor([0, 3, 2])  # a class, the null label, another class
        with torch.no_grad():
            want = wrapper(*values).numpy()
        got = session.run(None, {n: v.numpy() for n, v in zip(names_b, values)})[0]
        assert got.shape == want.shape
        assert np.abs(want).max() > 1e-2  # perturbed weights: a non-trivial output
        assert np.abs(got - want).max() < 1e-4, (exporter, batch)
    print(f"onnx export via {exporter} in {elapsed:.2f}s")


# ------------------------------------------------------------------------------------- params and FLOPs


def test_flop_counter_closed_forms():
    lin = nn.Linear(7, 5)
    assert count_flops(lin, torch.zeros(3, 7)) == 2 * 3 * 7 * 5
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    assert count_flops(conv, torch.zeros(2, 3, 6, 5)) == 2 * 2 * (3 * 9) * 4 * (6 * 5)
    strided = nn.Conv2d(4, 6, kernel_size=1, stride=2)
    assert count_flops(strided, torch.zeros(1, 4, 8, 8)) == 2 * 4 * 6 * (4 * 4)

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.zeros(2, 3, 10, 8), torch.zeros(2, 3, 13, 8), torch.zeros(2, 3, 13, 8)
    assert count_flops(Attn(), (q, k, v)) == 2 * (2 * 3 * 10 * 13 * 8) * 2


def test_paper_preset_size():
    """Sanchez et al. 2022: ~27M parameters, 22.9 GFLOP per forward (64x64x4, batch 1). tau(c) is a
    d_tau x d_tau matrix; d_tau = 256 (the time-embedding width) reproduces both figures."""
    cfg = UNetConfig(in_channels=4, out_channels=4, image_size=64, model_channels=64, channel_mult=(1, 2, 3, 4),
                     num_res_blocks=2, attention_resolutions=(32, 16, 8), num_head_channels=64, num_classes=2,
                     attention_conditioning=True, label_token_dim=256, label_tokens=256)
    model = UNet(cfg).eval()
    params = model.param_count()
    flops = count_flops(model, model.onnx_inputs(1)[1])
    print(f"paper preset: {params} parameters, {flops / 1e9:.3f} GFLOP")
    assert abs(params - 27e6) / 27e6 < 0.03
    assert abs(flops - 22.9e9) / 22.9e9 < 0.02
