"""The diffusion autoencoder (Preechakul et al. 2022) as used by Atad et al. (2024).

Two networks trained together with the epsilon loss of Atad et al. eq. (1):

    z_sem = Enc(x_0)                              semantic encoder: half-UNet, global average pool, Linear
    L     = E_{x_0, t, eps} || eps - eps_theta(x_t, t, z_sem) ||^2,   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps

eps_theta is medcfx's UNet with ``z_sem_dim > 0``: in every ResBlock h = GN(h)(1 + s_t) + b_t, then
h = h (1 + Linear(z_sem)) (the AdaGN "scale" of the semantic code). The gradient of L reaches the encoder
through z_sem; no label is used.

Stochastic code (DDIM inversion conditioned on z_sem, eta = 0) and decoding:

    x_T = encode(eps_theta(., ., z_sem), x_0, grid_enc, N_enc)          (paper: 250 steps)
    x_0' = decode(eps_theta(., ., z_sem'), x_T, grid_dec, N_dec)        (paper: 100 steps)

Both grids are "N evenly spaced model timesteps over [0, T-1]" (``Schedule.respace(N)``), so both end at
the model timestep T-1 and x_T means the same noise level for any pair of step counts. With z_sem' =
z_sem this reconstructs x_0 (exactly up to the ODE discretisation); with an edited z_sem' it decodes a
counterfactual that keeps the stochastic details of x_0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medcfx.errors import MedcfxError, UsageError

# names and network settings live in a torch-free module (the plugin's registration imports them, and
# `medcfx --help` must not import torch); re-exported here where they always were
from medcfx_diffae.configs import (  # noqa: F401
    DEMO_ENCODER,
    DEMO_GRADER,
    DEMO_MODEL,
    DEMO_NETWORK,
    GRADER_METHOD,
    METHOD,
    PAPER_ENCODER,
    PAPER_NETWORK,
)


class DiffAE(nn.Module):
    """Semantic encoder + z_sem-conditioned UNet in one module (one state dict: ``encoder.*``, ``unet.*``).

    ``forward(x_t, t, x0=None, z_sem=None)``: eps_theta(x_t, t, z_sem) with z_sem = encoder(x0) when x0 is
    given (training: the loss then trains both networks), else the given z_sem.
    """

    def __init__(self, network: dict, encoder: dict) -> None:
        super().__init__()
        from medcfx.nn import HalfUNetEncoder, UNet

        self.unet = UNet.from_config(network)
        self.encoder = HalfUNetEncoder.from_config(encoder)
        if self.unet.config.z_sem_dim != self.encoder.config.out_dim:
            raise UsageError(f"diffae config: network.z_sem_dim ({self.unet.config.z_sem_dim}) must equal "
                             f"encoder.out_dim ({self.encoder.config.out_dim})")
        if self.unet.config.in_channels != self.encoder.config.in_channels:
            raise UsageError("diffae config: network.in_channels and encoder.in_channels differ")

    @property
    def image_size(self) -> int:
        return self.unet.config.image_size

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels

    def forward(self, x_t, t, x0=None, z_sem=None):
        if x0 is not None:
            z_sem = self.encoder(x0)
        return self.unet(x_t, t, z_sem=z_sem)


def build(config: dict) -> DiffAE:
    return DiffAE(dict(config["network"]), dict(config["encoder"]))


@dataclass
class Loaded:
    """An autoencoder loaded from the registry."""

    model: DiffAE
    entry: object
    schedule: object
    preprocess: dict
    sample: dict


def load_autoencoder(registry, ref, device: str = "cpu") -> Loaded:
    """Build the DiffAE of a registry entry (method ``diffae``) and load its sha256-verified weights."""
    from medcfx.diffusion import Schedule
    from medcfx.loading import load_state

    entry = registry.resolve(ref)
    if entry.method != METHOD:
        raise UsageError(f"model {entry.ref} is a '{entry.method}' model, not a diffusion autoencoder ('{METHOD}')")
    cfg = entry.config
    for key in ("network", "encoder", "diffusion"):
        if key not in cfg:
            raise MedcfxError(f"model {entry.ref} has no '{key}' config: it is not a diffae model")
    model = build(cfg)
    load_state(model, registry.load_tensors(entry, "weights"), f"{entry.ref} (weights)")
    model = model.to(device).eval()
    d = cfg["diffusion"]
    schedule = Schedule.create(d.get("schedule", "linear"), int(d.get("T", 1000)))
    return Loaded(model, entry, schedule, dict(cfg.get("preprocess", {})), dict(cfg.get("sample", {})))


# ---------------------------------------------------------------------------------------------------------
# semantic and stochastic codes


@torch.no_grad()
def semantic(model: DiffAE, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """z_sem = Enc(x) for x [B, C, S, S] in [-1, 1], in batches; float32 [B, z_dim] on x's device."""
    parts = [model.encoder(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, model.encoder.config.out_dim)


def _grid(schedule, steps: int):
    if isinstance(steps, bool) or int(steps) < 1 or int(steps) > schedule.T:
        raise UsageError(f"step count must be in [1, {schedule.T}], got {steps!r}")
    return schedule.respace(int(steps))


@torch.no_grad()
def stochastic_encode(model: DiffAE, schedule, x0: torch.Tensor, z_sem: torch.Tensor, steps: int) -> torch.Tensor:
    """x_T: deterministic DDIM inversion of x0 conditioned on z_sem over ``steps`` evenly spaced timesteps."""
    from medcfx.diffusion import TorchDenoiser, encode

    grid = _grid(schedule, steps)
    return encode(TorchDenoiser(model.unet), x0, grid, grid.N, cond={"z_sem": z_sem})


@torch.no_grad()
def decode_codes(model: DiffAE, schedule, x_T: torch.Tensor, z_sem: torch.Tensor, steps: int) -> torch.Tensor:
    """x_0 from (z_sem, x_T): deterministic DDIM (eta = 0) over ``steps`` evenly spaced timesteps."""
    from medcfx.diffusion import TorchDenoiser, decode

    grid = _grid(schedule, steps)
    return decode(TorchDenoiser(model.unet), x_T, grid, grid.N, cond={"z_sem": z_sem})


# ---------------------------------------------------------------------------------------------------------
# inputs


def preprocess_config(prep: dict):
    from medcfx.data import PreprocessConfig

    return PreprocessConfig.from_dict(prep)


def load_input(path: Path, prep: dict, channels: int, log=None) -> np.ndarray:
    """One image file -> float32 [C, S, S] in [-1, 1], read and scaled as every command reads a 2D image
    (:func:`medcfx.inputs.load_image`: the model's recorded intensity rule, grey <-> RGB by luma); ``log``
    gets one line per note of the reader (MONOCHROME1 inverted, CT window, a dark nominal range ...).

    Raises UsageError for a NIfTI volume and MedcfxError (one line naming the file) for an unreadable image.
    """
    from medcfx.data.io import is_volume_file
    from medcfx.inputs import load_image

    path = Path(path)
    if is_volume_file(path) or path.is_dir():
        raise UsageError(f"{path}: diffae works on 2D images (PNG, TIFF, DICOM, .npy), not volumes")
    return load_image(path, preprocess_config(prep), channels, log=log).images[0]


def to_display(x: np.ndarray) -> np.ndarray:
    """Model image [C, S, S] in [-1, 1] -> uint8 [S, S] (channel mean), with the fixed window [-1, 1]."""
    from medcfx.viz import to_uint8

    return to_uint8(np.asarray(x, dtype=np.float64).mean(axis=0), -1.0, 1.0)


def clone_config(cfg: dict) -> dict:
    return copy.deepcopy(cfg)
