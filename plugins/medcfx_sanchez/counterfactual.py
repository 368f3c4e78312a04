"""Algorithm 1 of Sanchez et al. (2022): healthy counterfactuals by DDIM encode / guided decode.

    encode  x_0 -> x_L   with the null condition, L = round(noise_level * steps) of the respaced steps
            (DDIM inversion as in the paper; ``solver="dpm++2m"`` swaps both loops for DPM-Solver++(2M))
    decode  x_L -> x_cf  with eps = eps(null) + w (eps(healthy) - eps(null))        (implicit guidance)
    (``guidance_interval`` "LO:HI" in t / T: guided only at those model timesteps, the healthy branch
    alone elsewhere -- Kynkaanniemi et al. 2024; "0:1", the default, is the paper's loop)
    both with dynamic normalisation of x0_hat at every step (s = max(1, quantile(|x0_hat|, p)) per sample
    and channel, x0_hat <- clamp(x0_hat, -s, s) / s, eps re-derived), or static clipping when p = 0
    heatmap = mean over channels of |x_0 - x_cf|

The same function serves the paper's baselines and ablations, as configurations of one loop:

- ``guidance="cfg"`` with w: the method (and its AdaGN-only ablation, a network without attention tokens);
  w = 0 decodes with the null branch only (the "CDPM" row of Table 2: no guidance).
- ``guidance="none"``: an unconditional network (CDPM_healthy).
- ``guidance="classifier"``: an unconditional network guided by a noise-aware classifier's gradient
  towards "healthy" during decoding (Wolleb et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medcfx.diffusion import (
    SOLVERS,
    InversionRecord,
    classifier_free,
    classifier_gradient,
    decode,
    dynamic_normalise,
    encode,
    guidance_interval,
    static_clip,
)
from medcfx.errors import UsageError

HEALTHY, UNHEALTHY = 0, 1


@dataclass(frozen=True)
class CFParams:
    guidance: float = 3.0  # w (cfg) or s (classifier)
    noise_level: float = 0.75  # L as a fraction of the respaced steps
    steps: int = 100  # respaced DDIM steps ("ddim100")
    dn_percentile: float = 0.99  # 0: static clip to [-1, 1] instead
    solver: str = "ddim"  # "ddim" (the paper) or "dpm++2m" (second order, for fewer steps)
    guidance_interval: str = "0:1"  # "LO:HI": cfg only where LO <= t / T <= HI (a string: JSON-stable)
    sampler: str = "paper"  # the --sampler the values came from (recorded; the loops read the fields above)
    reuse_inversion: bool = False  # the decode's null branch from the encode's evaluation at the same timestep

    def check(self) -> "CFParams":
        object.__setattr__(self, "guidance_interval", format_interval(parse_interval(self.guidance_interval)))
        if not 0 < self.noise_level <= 1:
            raise UsageError(f"--noise-level must be in (0, 1], got {self.noise_level}")
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if not (self.dn_percentile == 0 or 0.5 <= self.dn_percentile < 1):
            raise UsageError(f"--dn-percentile must be 0 (off) or in [0.5, 1), got {self.dn_percentile}")
        if self.solver not in SOLVERS:
            raise UsageError(f"--solver (explain.solver) must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if round(self.noise_level * self.steps) < 1:  # L = 0: no encoding, x_cf = x, an all-zero heatmap
            raise UsageError(f"--noise-level {self.noise_level:g} x --steps {self.steps} encodes by 0 steps "
                             f"(L = round(noise_level x steps) must be >= 1): the heatmap would be 0 everywhere")
        if self.guidance < 0:
            raise UsageError(f"--guidance must be >= 0, got {self.guidance}")
        return self


def parse_interval(value) -> tuple[float, float]:
    """"LO:HI" (or a pair) -> (LO, HI), fractions of the diffusion's T with 0 <= LO <= HI <= 1.
    Raises UsageError naming --guidance-interval otherwise."""
    try:
        lo, hi = (value.split(":") if isinstance(value, str) else value)
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise UsageError(f"--guidance-interval (explain.guidance_interval) must be LO:HI (fractions of T, e.g. 0.2:1), "
                         f"got {value!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise UsageError(f"--guidance-interval (explain.guidance_interval) needs 0 <= LO <= HI <= 1, got {value!r}")
    return lo, hi


def format_interval(interval: tuple[float, float]) -> str:
    return f"{interval[0]:g}:{interval[1]:g}"


def _in_interval(guided, unguided, params: CFParams, T: int):
    """``guided`` restricted to ``params.guidance_interval`` (fractions of T -> model timesteps)."""
    lo, hi = parse_interval(params.guidance_interval)
    return guided if (lo, hi) == (0.0, 1.0) else guidance_interval(guided, unguided, lo * T, hi * T)


def x0_process(p: float):
    return dynamic_normalise(p, per_channel=True) if p > 0 else static_clip


def counterfactual(denoiser, x: torch.Tensor, schedule, params: CFParams, guidance: str = "cfg",
                   null_label: int | None = None, classifier_grad=None) -> torch.Tensor:
    """Healthy counterfactual of a batch ``x`` [B, C, H, W] in [-1, 1] (Alg. 1)."""
    grid = schedule.respace(f"ddim{params.steps}")
    L = grid.level_for_fraction(params.noise_level)
    proc = x0_process(params.dn_percentile)
    n = x.shape[0]
    if guidance == "cfg":
        null = torch.full((n,), null_label, dtype=torch.long, device=x.device)
        healthy = torch.full((n,), HEALTHY, dtype=torch.long, device=x.device)
        if params.reuse_inversion:
            recorded = InversionRecord(denoiser)
            x_l = encode(recorded, x, grid, L, cond={"y": null}, x0_process=proc, solver=params.solver)
            guided = recorded.guided(params.guidance, null_label)
        else:
            x_l = encode(denoiser, x, grid, L, cond={"y": null}, x0_process=proc, solver=params.solver)
            guided = classifier_free(denoiser, params.guidance, null_label)
        guided = _in_interval(guided, denoiser, params, schedule.T)
        return decode(guided, x_l, grid, L, cond={"y": healthy}, x0_process=proc, solver=params.solver)
    if guidance == "none":
        x_l = encode(denoiser, x, grid, L, x0_process=proc, solver=params.solver)
        return decode(denoiser, x_l, grid, L, x0_process=proc, solver=params.solver)
    if guidance == "classifier":
        x_l = encode(denoiser, x, grid, L, x0_process=proc, solver=params.solver)
        guided = _in_interval(classifier_gradient(denoiser, classifier_grad, params.guidance, schedule), denoiser,
                              params, schedule.T)
        return decode(guided, x_l, grid, L, x0_process=proc, solver=params.solver)
    raise UsageError(f"unknown guidance kind {guidance!r}")


def reconstruction(denoiser, x: torch.Tensor, schedule, params: CFParams, guidance: str = "cfg",
                   null_label: int | None = None) -> torch.Tensor:
    """The inversion self-check of a batch ``x`` [B, C, H, W]: the same encode as :func:`counterfactual`,
    then an unguided decode with the encoding's own condition (the null label for "cfg"; the unconditional
    network otherwise). DDIM inversion is exact in the limit of small steps, so ``|x - reconstruction|``
    measures how far the model and the discretisation are from reproducing this input; where it is large,
    a heatmap ``|x - x_cf|`` shows the reconstruction error as much as the lesion."""
    grid = schedule.respace(f"ddim{params.steps}")
    L = grid.level_for_fraction(params.noise_level)
    proc = x0_process(params.dn_percentile)
    cond = None
    if guidance == "cfg":
        cond = {"y": torch.full((x.shape[0],), null_label, dtype=torch.long, device=x.device)}
    x_l = encode(denoiser, x, grid, L, cond=cond, x0_process=proc, solver=params.solver)
    return decode(denoiser, x_l, grid, L, cond=cond, x0_process=proc, solver=params.solver)


def heatmap(x: torch.Tensor, x_cf: torch.Tensor) -> torch.Tensor:
    """Channel mean of |x - x_cf|: [B, C, H, W] -> [B, H, W]."""
    return (x - x_cf).abs().mean(dim=1)
