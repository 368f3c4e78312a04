"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022; Kaleta et al. 2025,
appendix C), sized for a CPU.

Encoder E: x [B, C, H, W] -> (mu, logvar) [B, z, H/f, W/f] with f = 2**(len(channel_mult) - 1):
    conv_in -> per level ``num_res_blocks`` ResBlocks (and a stride-2 conv between levels) -> middle
    ResBlock -> GroupNorm, SiLU, conv to 2 z channels (mean and log-variance, logvar clamped to [-30, 20]).
Decoder D: z -> x' mirrors it (nearest-neighbour x2 upsampling + conv between levels), no output squashing.

The latent handed to the diffusion model is ``scale_factor * mu`` (the posterior mean: deterministic,
so an image always has one latent); ``scale_factor`` = 1 / std of mu over the training images (computed
after training, as LDM's ``scale_by_std``), so that the latents have about unit variance like the
diffusion noise.

Training loss (per batch, images x in [-1, 1], z ~ q(z|x) by the reparameterisation z = mu + sigma eps):
    L = l1 * |x - D(z)|_1 + ssim_weight * (1 - SSIM(x, D(z))) + kl_weight * KL + adv_weight * L_G
with the closed-form Gaussian KL to N(0, I), summed over latent elements and averaged over the batch:
    KL = 1/B sum_b 0.5 sum_i (mu_i^2 + exp(logvar_i) - 1 - logvar_i).
The paper uses an LPIPS perceptual loss (weight 0.5 from step 50k) and a patch discriminator; LPIPS needs
pretrained VGG weights that cannot be downloaded here, so medcfx uses SSIM in its place (documented
deviation). The optional patch discriminator (pix2pix-style, hinge loss) switches on at ``disc_start``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medcfx.errors import UsageError
from medcfx.ssim import ssim  # mean SSIM, 11x11 Gaussian window, sigma 1.5, 'valid' positions (also imported from here)


@dataclass(frozen=True)
class AEConfig:
    """Architecture of the autoencoder (JSON-serialisable)."""

    in_channels: int = 1
    latent_channels: int = 4
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    num_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        p = "autoencoder config:"
        for name in ("in_channels", "latent_channels", "base_channels", "num_res_blocks", "num_groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{p} {name} must be a positive integer, got {v!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise UsageError(f"{p} channel_mult must be a non-empty list of positive integers")
        for w in {self.base_channels * m for m in self.channel_mult}:
            if w % self.num_groups:
                raise UsageError(f"{p} num_groups {self.num_groups} does not divide the channel count {w}")

    @property
    def factor(self) -> int:
        """Downsampling factor f = H / h."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"autoencoder config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.n1 = nn.GroupNorm(groups, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.n2 = nn.GroupNorm(groups, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: AEConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch, 3, padding=1)]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(_ResBlock(ch, cfg.base_channels * mult, cfg.num_groups))
                ch = cfg.base_channels * mult
            if level != len(cfg.channel_mult) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        layers += [_ResBlock(ch, ch, cfg.num_groups), nn.GroupNorm(cfg.num_groups, ch), nn.SiLU(),
                   nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    def __init__(self, cfg: AEConfig) -> None:
        super().__init__()
        ch = cfg.base_channels * cfg.channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch, 3, padding=1), _ResBlock(ch, ch, cfg.num_groups)]
        for level in reversed(range(len(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks):
                layers.append(_ResBlock(ch, cfg.base_channels * cfg.channel_mult[level], cfg.num_groups))
                ch = cfg.base_channels * cfg.channel_mult[level]
            if level != 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [nn.GroupNorm(cfg.num_groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class KLAutoencoder(nn.Module):
    """E and D with the posterior N(mu, exp(logvar)); ``forward(x, noise)`` -> (recon, mu, logvar)."""

    def __init__(self, config: AEConfig | dict) -> None:
        super().__init__()
        self.config = AEConfig.from_dict(config) if isinstance(config, dict) else config
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def check_input(self, x: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.config.factor
        if x.dim() != 4 or x.shape[1] != c:
            raise UsageError(f"the autoencoder expects {c}-channel images [B, {c}, H, W], got shape {list(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise UsageError(f"image height and width must be multiples of the downsampling factor {f}, got {x.shape[2]}x{x.shape[3]}")

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        mu, logvar = self.encoder(x)
        z = mu if noise is None else mu + torch.exp(0.5 * logvar) * noise
        return self.decoder(z), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over each sample's latent elements, averaged over the batch."""
    per = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return per.flatten(1).sum(1).mean()


class PatchDiscriminator(nn.Module):
    """A small pix2pix-style patch discriminator: logits per patch [B, 1, h, w] (hinge loss)."""

    def __init__(self, in_channels: int, channels: int = 32, groups: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.GroupNorm(groups, 2 * channels), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AETrainModule(nn.Module):
    """What ``fit`` trains: the autoencoder and (optionally) its discriminator, so that both are
    checkpointed and resumed together. Only ``ae`` is registered."""

    def __init__(self, ae: KLAutoencoder, disc: PatchDiscriminator | None) -> None:
        super().__init__()
        self.ae = ae
        self.disc = disc

    def forward(self, x: torch.Tensor, noise: torch.Tensor):
        return self.ae(x, noise)


def ae_loss(module: AETrainModule, x: torch.Tensor, noise: torch.Tensor, weights: dict, adversarial: bool):
    """The training loss and its parts (see the module docstring).

    With ``adversarial``: the generator term L_G = -mean D(x') is computed through a detached copy of the
    discriminator's parameters (so it moves only the autoencoder) and the discriminator's hinge loss
    L_D = mean relu(1 - D(x)) + mean relu(1 + D(x'.detach())) moves only the discriminator; both are
    summed into one loss for one optimiser step.
    """
    net = module.module if hasattr(module, "module") and isinstance(module.module, AETrainModule) else module
    recon, mu, logvar = module(x, noise)
    l1 = (recon - x).abs().mean()
    s = ssim(recon.float(), x.float()).mean()
    kl = kl_divergence(mu.float(), logvar.float())
    loss = weights["l1"] * l1 + weights["ssim"] * (1 - s) + weights["kl"] * kl
    logs = {"l1": l1.detach(), "ssim": s.detach(), "kl": kl.detach()}
    if adversarial and net.disc is not None:
        frozen = {k: v.detach() for k, v in net.disc.named_parameters()}
        g = -torch.func.functional_call(net.disc, frozen, (recon,)).mean()
        d = F.relu(1 - net.disc(x)).mean() + F.relu(1 + net.disc(recon.detach())).mean()
        loss = loss + weights["adv"] * g + d
        logs.update(g_adv=g.detach(), d_hinge=d.detach())
    return loss, logs
