"""Diffusion core: schedules, DDIM/DDPM steps and loops, guidance and x0 processing.

See ``medcfx.diffusion.schedule`` for the level convention shared by every sampler (level 0 = clean data,
level k = model timestep ``timesteps[k-1]``; the step between levels k-1 and k uses that timestep in both
directions).
"""

from medcfx.diffusion.ddim import (
    SOLVERS,
    Denoiser,
    X0Process,
    ddim_inverse_step,
    ddim_step,
    ddpm_step,
    decode,
    dpmpp2m_step,
    dpmpp3m_step,
    encode,
    eps_from_x0,
    predict_eps,
    predict_x0,
    sample,
)
from medcfx.diffusion.denoiser import TorchDenoiser
from medcfx.diffusion.guidance import (
    InversionRecord,
    classifier_free,
    classifier_gradient,
    guidance_interval,
    log_prob_gradient,
)
from medcfx.diffusion.normalize import dynamic_normalise, dynamic_threshold_values, static_clip
from medcfx.diffusion.schedule import BETA_KINDS, Respaced, Schedule, make_betas, parse_respacing

__all__ = [
    "BETA_KINDS",
    "InversionRecord",
    "Denoiser",
    "Respaced",
    "SOLVERS",
    "Schedule",
    "TorchDenoiser",
    "X0Process",
    "classifier_free",
    "classifier_gradient",
    "ddim_inverse_step",
    "ddim_step",
    "ddpm_step",
    "decode",
    "dpmpp2m_step",
    "dpmpp3m_step",
    "dynamic_normalise",
    "dynamic_threshold_values",
    "encode",
    "eps_from_x0",
    "guidance_interval",
    "log_prob_gradient",
    "make_betas",
    "parse_respacing",
    "predict_eps",
    "predict_x0",
    "sample",
    "static_clip",
]
