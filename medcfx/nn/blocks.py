"""Building blocks of the ADM-style UNet (Dhariwal & Nichol 2021) with medcfx's conditioning slots.

Every block's forward is free of data-dependent Python control flow (branches depend only on how the block
was built), so a network made of them traces and exports to ONNX.

Notation: B batch, C channels, N = H*W spatial positions, emb the per-sample conditioning embedding
(time embedding, plus label embedding when used), z the diffae semantic vector, tokens the label token
sequence tau(c) of shape [B, d_tau, n_tokens].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer or real) timesteps, as in "Attention is all you need" / ADM.

    With half = dim // 2 and f_i = max_period ** (-i / half) for i = 0..half-1:
        emb(t) = [cos(t f_0), ..., cos(t f_{half-1}), sin(t f_0), ..., sin(t f_{half-1})]  (zero-padded
    to ``dim`` when dim is odd). Returns float32 [B, dim].
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half)
    args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Set all parameters of ``module`` to zero (used for the last layer of residual branches)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and parameter dtypes (stable under fp16/bf16),
    the result cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.type(x.dtype)


def _resample(h: torch.Tensor, mode: str) -> torch.Tensor:
    """'up': nearest-neighbour x2; 'down': 2x2 average pooling; 'none': identity."""
    if mode == "up":
        return F.interpolate(h, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(h, kernel_size=2, stride=2)
    return h


class ResBlock(nn.Module):
    """Residual block with adaptive group norm (AdaGN) conditioning.

    in:   h = conv3x3(resample(SiLU(GN(x))))                  (resample: 'up', 'down' or none)
    emb:  e = Linear(SiLU(emb))
          use_scale_shift_norm: (s, b) = split(e);  h = GN(h) * (1 + s) + b
          otherwise:            h = GN(h + e)
    z:    h = h * (1 + Linear(z))                               (only when z_dim > 0; diffae)
    out:  h = conv3x3_zero_init(Dropout(SiLU(h)))
    return skip(resample(x)) + h        skip = identity, or a 1x1 conv when the channel count changes.

    With ``emb_channels == 0`` (e.g. the semantic encoder) there is no embedding: h = GN(h).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float,
        num_groups: int,
        use_scale_shift_norm: bool = True,
        z_dim: int = 0,
        resample: str = "none",
    ) -> None:
        super().__init__()
        if resample not in ("none", "up", "down"):
            raise ValueError(f"resample must be 'none', 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.use_scale_shift_norm = bool(use_scale_shift_norm) and emb_channels > 0
        self.in_norm = GroupNorm32(num_groups, in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = None
        if emb_channels > 0:
            width = 2 * out_channels if self.use_scale_shift_norm else out_channels
            self.emb_proj = nn.Linear(emb_channels, width)
        self.z_proj = nn.Linear(z_dim, out_channels) if z_dim > 0 else None
        self.out_norm = GroupNorm32(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor | None = None, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(_resample(h, self.resample))
        x = _resample(x, self.resample)
        if self.emb_proj is None:
            h = self.out_norm(h)
        else:
            e = self.emb_proj(F.silu(emb))[:, :, None, None].type(h.dtype)
            if self.use_scale_shift_norm:
                scale, shift = e.chunk(2, dim=1)
                h = self.out_norm(h) * (1 + scale) + shift
            else:
                h = self.out_norm(h + e)
        if self.z_proj is not None:
            h = h * (1 + self.z_proj(z)[:, :, None, None].type(h.dtype))
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """3x3 convolution with stride 2 (used when ``resblock_updown`` is off)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution (used when ``resblock_updown`` is off)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_resample(x, "up"))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, optionally with extra label tokens in K and V.

    h = GN(x) flattened to [B, C, N];  [q; k; v] = Conv1d_1x1(h) with C channels each, and head i owns
    channels i*d .. (i+1)*d - 1 of q, k and v (d = C / heads).
    With tokens tau(c) [B, d_tau, n] (Sanchez et al. 2022, sec. 3.3; GLIDE's encoder_kv):
        [k_c; v_c] = Conv1d_1x1(tau(c)) (2C channels: first C keys, last C values)
        K = concat([k, k_c], sequence axis),  V = concat([v, v_c], sequence axis)
    per head: out = softmax(q^T K / sqrt(d)) V^T, heads stacked back to [B, C, N];
    return x + Conv1d_1x1_zero_init(out)  reshaped to [B, C, H, W].

    The softmax attention itself is ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory
    efficient kernels on GPU; exported to ONNX as MatMul-Softmax-MatMul).
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int, token_dim: int = 0) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = GroupNorm32(num_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.token_kv = nn.Conv1d(token_dim, 2 * channels, 1) if token_dim > 0 else None
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def _heads(self, a: torch.Tensor, parts: int) -> list[torch.Tensor]:
        """[B, parts*C, L] -> ``parts`` tensors [B, heads, L, d]."""
        b, _, length = a.shape
        a = a.reshape(b, parts, self.num_heads, self.channels // self.num_heads, length)
        return [a[:, i].transpose(-1, -2) for i in range(parts)]

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x).reshape(b, c, height * width)
        q, k, v = self._heads(self.qkv(h), 3)
        if self.token_kv is not None:
            kc, vc = self._heads(self.token_kv(tokens.type(h.dtype)), 2)
            k = torch.cat([k, kc], dim=2)
            v = torch.cat([v, vc], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
        out = out.transpose(-1, -2).reshape(b, c, height * width)
        return x + self.proj_out(out).reshape(b, c, height, width)


class CondSequential(nn.ModuleList):
    """A sequence of blocks, each given the conditioning it takes (decided by block type, not by data)."""

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for block in self:
            if isinstance(block, ResBlock):
                h = block(h, emb, z)
            elif isinstance(block, AttentionBlock):
                h = block(h, tokens)
            else:
                h = block(h)
        return h
