"""One ADM-style 2D UNet for all medcfx methods, with conditioning slots chosen by its config.

Slots (each off unless configured):
- class label y (``num_classes > 0``): index ``num_classes`` is the NULL label (classifier-free guidance),
  whose embedding is exactly zero. The label enters
    * the time embedding (``label_in_time_embedding``, AdaGN): emb = MLP(sinusoid(t)) + E_time[y]
    * every attention layer (``attention_conditioning``, Sanchez et al. 2022 sec. 3.3): the token matrix
      tau(y) = E_tok[y] reshaped to [label_token_dim, label_tokens] is projected per layer by a 1x1 conv
      and concatenated to that layer's keys and values.
- image conditioning (``cond_image_channels > 0``, restoration): the network sees cat([x, cond_image]).
- semantic vector z_sem (``z_sem_dim > 0``, diffae): in every ResBlock h = h * (1 + Linear(z_sem)) after
  the scale-shift norm.
- feature tap (mediffusion): ``forward_features`` also returns the last encoder feature map of every
  resolution level and the middle-block output.

Layout (ADM): input conv -> per level ``num_res_blocks`` x (ResBlock [+ attention]) and a downsampling
step between levels -> middle (ResBlock, attention, ResBlock) -> per level, deepest first,
``num_res_blocks + 1`` x (ResBlock on cat(h, skip) [+ attention]) and an upsampling step -> GN, SiLU,
zero-initialised 3x3 conv. Attention is placed where the FEATURE map is one of ``attention_resolutions``
(feature size = image_size / 2**level); the middle block always has attention.

The forward pass has no data-dependent Python control flow; input checks are skipped while tracing or
compiling, so the module exports to ONNX (see ``onnx_inputs`` and ``UNetForExport``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medcfx.errors import UsageError
from medcfx.nn.blocks import (
    AttentionBlock,
    CondSequential,
    Downsample,
    GroupNorm32,
    ResBlock,
    Upsample,
    timestep_embedding,
    zero_init,
)

# ----------------------------------------------------------------------------------------------- configs


def _coerce(where: str, field: dataclasses.Field, value: Any) -> Any:
    """Check a config value against its declared kind; lists become tuples (configs come from JSON)."""
    kind = str(field.type)
    name = f"{where} config: {field.name}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{name} must be a number, got {value!r}")
        return float(value)
    if kind.startswith("tuple"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise UsageError(f"{name} must be a list of integers, got {value!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise UsageError(f"{name} must be a list of integers, got {value!r}")
        return tuple(value)
    raise AssertionError(f"unhandled config field type {kind}")  # pragma: no cover


def _normalise(cfg: Any, where: str) -> None:
    for f in dataclasses.fields(cfg):
        object.__setattr__(cfg, f.name, _coerce(where, f, getattr(cfg, f.name)))


def _from_dict(cls: type, d: Any, where: str) -> Any:
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise UsageError(f"{where} config must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UsageError(f"{where} config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.name not in d
    )
    if missing:
        raise UsageError(f"{where} config: missing required key(s) {', '.join(missing)}")
    return cls(**d)


def _to_dict(cfg: Any) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _check_architecture(cfg: Any, where: str) -> None:
    """Checks shared by the UNet and the half-UNet encoder (same encoder path)."""
    p = f"{where} config:"
    if cfg.in_channels < 1:
        raise UsageError(f"{p} in_channels must be >= 1, got {cfg.in_channels}")
    if cfg.model_channels < 1:
        raise UsageError(f"{p} model_channels must be >= 1, got {cfg.model_channels}")
    if not cfg.channel_mult or min(cfg.channel_mult) < 1:
        raise UsageError(f"{p} channel_mult must be a non-empty list of positive integers, got {list(cfg.channel_mult)}")
    if cfg.num_res_blocks < 1:
        raise UsageError(f"{p} num_res_blocks must be >= 1, got {cfg.num_res_blocks}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UsageError(f"{p} dropout must be in [0, 1), got {cfg.dropout}")
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if cfg.image_size < 1 or cfg.image_size % factor:
        raise UsageError(
            f"{p} image_size {cfg.image_size} must be a positive multiple of {factor} "
            f"(2**(len(channel_mult)-1), one halving per level)"
        )
    resolutions = [cfg.image_size // 2**level for level in range(len(cfg.channel_mult))]
    bad = [r for r in cfg.attention_resolutions if r not in resolutions]
    if bad:
        raise UsageError(
            f"{p} attention_resolutions {bad} are not feature resolutions of this network "
            f"(feature resolutions: {resolutions})"
        )
    if cfg.num_groups < 1:
        raise UsageError(f"{p} num_groups must be >= 1, got {cfg.num_groups}")
    widths = sorted({cfg.model_channels} | {cfg.model_channels * m for m in cfg.channel_mult})
    for w in widths:
        if w % cfg.num_groups:
            raise UsageError(f"{p} num_groups {cfg.num_groups} does not divide the channel count {w}")
    if (cfg.num_head_channels > 0) == (cfg.num_heads > 0):
        raise UsageError(
            f"{p} set exactly one of num_head_channels and num_heads to a positive value "
            f"(got num_head_channels={cfg.num_head_channels}, num_heads={cfg.num_heads})"
        )
    attn_levels = [lv for lv, r in enumerate(resolutions) if r in cfg.attention_resolutions]
    attn_widths = {cfg.model_channels * cfg.channel_mult[lv] for lv in attn_levels}
    attn_widths.add(cfg.model_channels * cfg.channel_mult[-1])  # the middle block always has attention
    for w in sorted(attn_widths):
        if cfg.num_head_channels > 0 and w % cfg.num_head_channels:
            raise UsageError(f"{p} num_head_channels {cfg.num_head_channels} does not divide the attention width {w}")
        if cfg.num_heads > 0 and w % cfg.num_heads:
            raise UsageError(f"{p} num_heads {cfg.num_heads} does not divide the attention width {w}")


def _heads(cfg: Any, channels: int) -> int:
    return channels // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a ``UNet``; every field is JSON-serialisable (``to_dict`` / ``from_dict``).

    attention_resolutions are FEATURE-map sizes: with image_size 64, (32, 16, 8) puts attention at levels
    1, 2 and 3. Attention heads: either ``num_head_channels`` (heads = width / num_head_channels) or
    ``num_heads`` (fixed), exactly one positive. Label y is int64 in [0, num_classes]; num_classes is the
    null label. ``label_token_dim`` x ``label_tokens`` is the size of tau(c) (the paper's d_tau x d_tau).
    """

    in_channels: int
    out_channels: int
    image_size: int
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.1
    num_head_channels: int = 64
    num_heads: int = 0
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    num_classes: int = 0
    label_in_time_embedding: bool = True
    attention_conditioning: bool = False
    label_tokens: int = 4
    label_token_dim: int = 256
    cond_image_channels: int = 0
    z_sem_dim: int = 0
    num_groups: int = 32

    def __post_init__(self) -> None:
        where = "unet"
        _normalise(self, where)
        _check_architecture(self, where)
        p = f"{where} config:"
        if self.out_channels < 1:
            raise UsageError(f"{p} out_channels must be >= 1, got {self.out_channels}")
        for name in ("num_classes", "cond_image_channels", "z_sem_dim"):
            if getattr(self, name) < 0:
                raise UsageError(f"{p} {name} must be >= 0, got {getattr(self, name)}")
        if self.label_tokens < 1 or self.label_token_dim < 1:
            raise UsageError(f"{p} label_tokens and label_token_dim must be >= 1")
        if self.attention_conditioning and self.num_classes == 0:
            raise UsageError(f"{p} attention_conditioning needs num_classes > 0")
        if self.num_classes > 0 and not (self.label_in_time_embedding or self.attention_conditioning):
            raise UsageError(
                f"{p} num_classes > 0 but the label enters nowhere: enable label_in_time_embedding "
                f"and/or attention_conditioning"
            )

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return _from_dict(cls, d, "unet")


@dataclass(frozen=True)
class HalfUNetConfig:
    """Architecture of a ``HalfUNetEncoder`` (diffae semantic encoder): encoder path + middle of the UNet,
    no time embedding, then GN-SiLU-global average pool-Linear to ``out_dim``."""

    in_channels: int
    image_size: int
    out_dim: int = 512
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.1
    num_head_channels: int = 64
    num_heads: int = 0
    resblock_updown: bool = True
    num_groups: int = 32

    def __post_init__(self) -> None:
        where = "semantic encoder"
        _normalise(self, where)
        _check_architecture(self, where)
        if self.out_dim < 1:
            raise UsageError(f"{where} config: out_dim must be >= 1, got {self.out_dim}")

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HalfUNetConfig":
        return _from_dict(cls, d, "semantic encoder")


# ------------------------------------------------------------------------------------------------ modules


def _exporting() -> bool:
    """True while tracing / scripting / exporting / compiling: skip Python-side input checks then."""
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


class UNetEncoderPath(nn.Module):
    """Input conv, the encoder levels and the middle block of the UNet (shared with the half-UNet).

    forward(x, emb, z, tokens) -> (h_middle, skips, feats):
      skips: the input-conv output, every unit output and every downsampling output (ADM order), for the
             decoder;
      feats: the last unit output of each level (before downsampling) and the middle output.
    """

    def __init__(self, cfg: Any, emb_channels: int, z_dim: int, token_dim: int, use_scale_shift_norm: bool) -> None:
        super().__init__()
        mc = cfg.model_channels

        def resblock(cin: int, cout: int, resample: str = "none") -> ResBlock:
            return ResBlock(cin, cout, emb_channels, cfg.dropout, cfg.num_groups, use_scale_shift_norm, z_dim, resample)

        self.input_conv = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch, res = mc, cfg.image_size
        self.skip_channels = [ch]
        self.feature_channels: list[int] = []
        self.feature_resolutions: list[int] = []
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            units = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks: list[nn.Module] = [resblock(ch, mc * mult)]
                ch = mc * mult
                if res in cfg.attention_resolutions:
                    blocks.append(AttentionBlock(ch, _heads(cfg, ch), cfg.num_groups, token_dim))
                units.append(CondSequential(blocks))
                self.skip_channels.append(ch)
            self.levels.append(units)
            self.feature_channels.append(ch)
            self.feature_resolutions.append(res)
            if level != last:
                down = resblock(ch, ch, "down") if cfg.resblock_updown else Downsample(ch)
                self.downsamples.append(CondSequential([down]))
                self.skip_channels.append(ch)
                res //= 2
        self.middle = CondSequential(
            [resblock(ch, ch), AttentionBlock(ch, _heads(cfg, ch), cfg.num_groups, token_dim), resblock(ch, ch)]
        )
        self.feature_channels.append(ch)
        self.feature_resolutions.append(res)
        self.out_channels = ch

    def forward(self, x, emb=None, z=None, tokens=None):
        h = self.input_conv(x)
        skips, feats = [h], []
        for level, units in enumerate(self.levels):
            for unit in units:
                h = unit(h, emb, z, tokens)
                skips.append(h)
            feats.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h, emb, z, tokens)
                skips.append(h)
        h = self.middle(h, emb, z, tokens)
        feats.append(h)
        return h, skips, feats


class UNet(nn.Module):
    """forward(x, t, y=None, cond_image=None, z_sem=None) -> eps, float32 [B, out_channels, H, W].

    x [B, in_channels, H, W] (H, W multiples of 2**(levels-1); the config's image_size fixes where attention
    sits), t [B] model timesteps (int64), y [B] int64 in [0, num_classes] (num_classes = null label),
    cond_image [B, cond_image_channels, H, W], z_sem [B, z_sem_dim]. An input is required exactly when its
    slot is configured; anything else raises ValueError.
    """

    def __init__(self, config: UNetConfig | dict) -> None:
        super().__init__()
        cfg = UNetConfig.from_dict(config) if isinstance(config, dict) else config
        if not isinstance(cfg, UNetConfig):
            raise UsageError(f"unet config must be a UNetConfig or a mapping, got {type(cfg).__name__}")
        self.config = cfg
        mc = cfg.model_channels
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        labelled = cfg.num_classes > 0
        self.label_emb = nn.Embedding(cfg.num_classes, emb_ch) if labelled and cfg.label_in_time_embedding else None
        self.label_token_emb = (
            nn.Embedding(cfg.num_classes, cfg.label_token_dim * cfg.label_tokens) if cfg.attention_conditioning else None
        )
        token_dim = cfg.label_token_dim if cfg.attention_conditioning else 0
        enc_cfg = dataclasses.replace(cfg, in_channels=cfg.in_channels + cfg.cond_image_channels)
        self.encoder = UNetEncoderPath(enc_cfg, emb_ch, cfg.z_sem_dim, token_dim, cfg.use_scale_shift_norm)

        def resblock(cin: int, cout: int, resample: str = "none") -> ResBlock:
            return ResBlock(
                cin, cout, emb_ch, cfg.dropout, cfg.num_groups, cfg.use_scale_shift_norm, cfg.z_sem_dim, resample
            )

        skip_channels = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        res = self.encoder.feature_resolutions[-1]
        self.decoder = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            units = nn.ModuleList()
            for i in range(cfg.num_res_blocks + 1):
                cout = mc * cfg.channel_mult[level]
                blocks: list[nn.Module] = [resblock(ch + skip_channels.pop(), cout)]
                ch = cout
                if res in cfg.attention_resolutions:
                    blocks.append(AttentionBlock(ch, _heads(cfg, ch), cfg.num_groups, token_dim))
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(resblock(ch, ch, "up") if cfg.resblock_updown else Upsample(ch))
                    res *= 2
                units.append(CondSequential(blocks))
            self.decoder.append(units)
        assert not skip_channels
        self.out = nn.Sequential(
            GroupNorm32(cfg.num_groups, ch), nn.SiLU(), zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    # -- construction / introspection -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict | UNetConfig) -> "UNet":
        return cls(config)

    @property
    def null_label(self) -> int | None:
        """The label index meaning "no label" (= num_classes), or None when the network takes no label."""
        return self.config.num_classes if self.config.num_classes > 0 else None

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def feature_channels(self) -> list[int]:
        """Channel counts of ``forward_features``' feats: one per encoder level, then the middle block."""
        return list(self.encoder.feature_channels)

    def feature_resolutions(self) -> list[int]:
        """Spatial sizes of the feats for an input of ``image_size`` (they scale with the input)."""
        return list(self.encoder.feature_resolutions)

    # -- forward -----------------------------------------------------------------------------------------
    def _check_inputs(self, x, t, y, cond_image, z_sem) -> None:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"unet: x must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        b, _, hh, ww = x.shape
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if hh % factor or ww % factor:
            raise ValueError(f"unet: x height and width must be multiples of {factor}, got {hh}x{ww}")
        if t.shape != (b,):
            raise ValueError(f"unet: t must be [B] = [{b}], got {list(t.shape)}")

        def slot(name: str, value, wanted: bool, hint: str) -> None:
            if wanted and value is None:
                raise ValueError(f"unet: {name} is required ({hint})")
            if not wanted and value is not None:
                raise ValueError(f"unet: {name} was given but this network has no {name} slot ({hint})")

        slot("y", y, cfg.num_classes > 0, f"num_classes={cfg.num_classes}")
        slot("cond_image", cond_image, cfg.cond_image_channels > 0, f"cond_image_channels={cfg.cond_image_channels}")
        slot("z_sem", z_sem, cfg.z_sem_dim > 0, f"z_sem_dim={cfg.z_sem_dim}")
        if y is not None:
            if y.shape != (b,) or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"unet: y must be an integer tensor [B] = [{b}], got {y.dtype} {list(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
                raise ValueError(f"unet: y must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null label)")
        if cond_image is not None and cond_image.shape != (b, cfg.cond_image_channels, hh, ww):
            raise ValueError(
                f"unet: cond_image must be [{b}, {cfg.cond_image_channels}, {hh}, {ww}], got {list(cond_image.shape)}"
            )
        if z_sem is not None and z_sem.shape != (b, cfg.z_sem_dim):
            raise ValueError(f"unet: z_sem must be [{b}, {cfg.z_sem_dim}], got {list(z_sem.shape)}")

    def _label_vectors(self, table: nn.Embedding, y: torch.Tensor) -> torch.Tensor:
        """E[y] for y < num_classes and exactly 0 for the null label (mask, not a data-dependent branch)."""
        valid = y < self.config.num_classes
        rows = table(torch.where(valid, y, torch.zeros_like(y)))
        return rows * valid.unsqueeze(-1).to(rows.dtype)

    def forward_features(self, x, t, y=None, cond_image=None, z_sem=None):
        """(eps, feats): eps as ``forward``; feats[l] [B, feature_channels()[l], ., .] for each encoder level
        (last unit before downsampling), feats[-1] the middle-block output."""
        if not _exporting():
            self._check_inputs(x, t, y, cond_image, z_sem)
        cfg = self.config
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype))
        tokens = None
        if self.label_emb is not None:
            emb = emb + self._label_vectors(self.label_emb, y)
        if self.label_token_emb is not None:
            tokens = self._label_vectors(self.label_token_emb, y).reshape(-1, cfg.label_token_dim, cfg.label_tokens)
        h = x if cond_image is None else torch.cat([x, cond_image], dim=1)
        z = None if z_sem is None else z_sem.to(dtype)
        h, skips, feats = self.encoder(h.to(dtype), emb, z, tokens)
        for units in self.decoder:
            for unit in units:
                h = unit(torch.cat([h, skips.pop()], dim=1), emb, z, tokens)
        eps = self.out(h).float()
        return eps, feats

    def forward(self, x, t, y=None, cond_image=None, z_sem=None) -> torch.Tensor:
        return self.forward_features(x, t, y, cond_image, z_sem)[0]

    # -- export ------------------------------------------------------------------------------------------
    def onnx_inputs(self, batch: int = 1) -> tuple[list[str], tuple[torch.Tensor, ...]]:
        """Names and example tensors of the inputs this configuration takes, in the fixed export order
        x, t (int64), then y (int64, if num_classes), cond_image (if cond_image_channels), z_sem (if z_sem_dim).
        Deterministic (seed 0), on the module's device and dtype."""
        cfg = self.config
        p = next(self.parameters())
        g = torch.Generator().manual_seed(0)
        s = cfg.image_size
        names = ["x", "t"]
        values = [torch.randn(batch, cfg.in_channels, s, s, generator=g), torch.randint(0, 1000, (batch,), generator=g)]
        if cfg.num_classes > 0:
            names.append("y")
            values.append(torch.arange(batch, dtype=torch.int64) % (cfg.num_classes + 1))
        if cfg.cond_image_channels > 0:
            names.append("cond_image")
            values.append(torch.randn(batch, cfg.cond_image_channels, s, s, generator=g))
        if cfg.z_sem_dim > 0:
            names.append("z_sem")
            values.append(torch.randn(batch, cfg.z_sem_dim, generator=g))
        values = [v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device) for v in values]
        return names, tuple(values)


class UNetForExport(nn.Module):
    """Wraps a UNet so that forward takes exactly the positional inputs named by ``unet.onnx_inputs()``.

    Export (tested): ``names, example = unet.onnx_inputs(1)``; ``torch.onnx.export(UNetForExport(unet).eval(),
    example, path, input_names=names, output_names=["eps"], opset_version=17, dynamo=False,
    dynamic_axes={n: {0: "batch"} for n in [*names, "eps"]})``. With ``dynamo=True`` the inputs are one
    varargs group: ``dynamic_shapes=(tuple({0: torch.export.Dim("batch")} for _ in names),)``.
    """

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet
        self.input_names = unet.onnx_inputs(1)[0]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"UNetForExport expects inputs {self.input_names}, got {len(inputs)} tensors")
        return self.unet(**dict(zip(self.input_names, inputs)))


class HalfUNetEncoder(nn.Module):
    """Semantic encoder (diffae): the UNet's encoder path and middle block without time embedding, then
    GN - SiLU - global average pool - Linear:  forward(x [B, in_channels, H, W]) -> [B, out_dim]."""

    def __init__(self, config: HalfUNetConfig | dict) -> None:
        super().__init__()
        cfg = HalfUNetConfig.from_dict(config) if isinstance(config, dict) else config
        if not isinstance(cfg, HalfUNetConfig):
            raise UsageError(f"semantic encoder config must be a HalfUNetConfig or a mapping, got {type(cfg).__name__}")
        self.config = cfg
        self.encoder = UNetEncoderPath(cfg, emb_channels=0, z_dim=0, token_dim=0, use_scale_shift_norm=False)
        ch = self.encoder.out_channels
        self.norm = GroupNorm32(cfg.num_groups, ch)
        self.proj = nn.Linear(ch, cfg.out_dim)

    @classmethod
    def from_config(cls, config: dict | HalfUNetConfig) -> "HalfUNetEncoder":
        return cls(config)

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not _exporting() and (x.dim() != 4 or x.shape[1] != cfg.in_channels):
            raise ValueError(f"semantic encoder: x must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        h, _, _ = self.encoder(x.to(self.proj.weight.dtype))
        h = torch.nn.functional.silu(self.norm(h)).mean(dim=(2, 3))
        return self.proj(h).float()
