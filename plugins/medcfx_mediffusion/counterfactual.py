"""Targets, classifier guidance from the joint classifier, counterfactuals and guided generation.

Targets: ``<finding>`` (add: guide towards the finding) and ``no-<finding>`` (remove: guide away from it),
with the finding names of the model's label columns; several at once (``no-cardiomegaly,no-effusion``)
guide with the sum of their log-probabilities.

Guidance (Kaleta et al. 2025, eq. 2/7; Dhariwal & Nichol 2021):
    eps'(z_t) = eps_theta(z_t, t) - sqrt(1 - abar_t) * grad_{z_t} sum_j s_j log p_j(z_t, t)
with, for target j on finding k and the classifier's logits l(z_t, t):
    multi-label (sigmoid):  add: log p = log sigmoid(l_k),   remove: log p = log sigmoid(-l_k) = log(1 - p_k)
    single-label (softmax): add: log p = log softmax(l)_k,   remove: log p = log(1 - softmax(l)_k)
and s_j the target's guidance scale (paper: 500 to remove, 200 to add). This is
``medcfx.diffusion.classifier_gradient`` with scale 1 around a gradient that already carries the s_j.

Counterfactual (paper sec. 3.5 and appendix F): z_0 = scale_factor * E(x); "noise to t" is the FORWARD
process, z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (one q_sample, as the paper's appendix F: "add
noise ... running the forward diffusion process up to t=300"), not a DDIM inversion; then the reverse
process from model timestep t to 0 with guidance (ancestral DDPM steps by default, as the paper's
"backward diffusion process"; ``steps`` respaces the chain 0..t, "all" = every timestep), and
x' = D(z'_0 / scale_factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medcfx.diffusion import Respaced, TorchDenoiser, classifier_gradient, log_prob_gradient, sample
from medcfx.errors import UsageError


@dataclass(frozen=True)
class Target:
    name: str  # as given: "no-cardiomegaly"
    finding: str
    index: int
    add: bool


def known_targets(findings: list[str]) -> list[str]:
    return [t for f in findings for t in (f, f"no-{f}")]


def parse_targets(spec, findings: list[str]) -> list[Target]:
    """``"no-cardiomegaly,effusion"`` or a list of such names -> Targets; unknown or contradictory names are
    a one-line UsageError listing the known targets."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else (spec or [])) if s and s.strip()]
    known = ", ".join(known_targets(findings))
    if not items:
        raise UsageError(f"--target is required (known targets: {known})")
    out: list[Target] = []
    seen: set[str] = set()
    for name in items:
        add = not name.startswith("no-")
        finding = name if add else name[3:]
        if finding not in findings:
            raise UsageError(f"unknown target '{name}' (known targets: {known})")
        if finding in seen:
            raise UsageError(f"--target names '{finding}' twice ({', '.join(items)}): give each finding once")
        seen.add(finding)
        out.append(Target(name, finding, findings.index(finding), add))
    return out


def target_log_prob(kind: str, logits: torch.Tensor, targets: list[Target], scales: list[float]) -> torch.Tensor:
    """sum_j s_j log p_j per sample [B] (see the module docstring)."""
    total = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    lf = logits.float()
    for tg, s in zip(targets, scales):
        k = tg.index
        if kind == "bce":
            lp = F.logsigmoid(lf[:, k]) if tg.add else F.logsigmoid(-lf[:, k])
        else:
            logp = torch.log_softmax(lf, dim=1)
            if tg.add:
                lp = logp[:, k]
            else:  # log(1 - p_k) = logsumexp of the other logits - logsumexp of all
                others = torch.cat([lf[:, :k], lf[:, k + 1:]], dim=1)
                lp = torch.logsumexp(others, dim=1) - torch.logsumexp(lf, dim=1)
        total = total + float(s) * lp
    return total


def guided_denoiser(model, schedule, kind: str, targets: list[Target], scales: list[float]):
    """The denoiser eps'(z_t, t) = eps(z_t, t) - sqrt(1 - abar_t) grad sum_j s_j log p_j (``model`` is a
    JointModel: ``model.unet`` the denoiser, ``model.logits(z, t)`` the classifier)."""
    base = TorchDenoiser(model.unet)
    if not targets or all(float(s) == 0.0 for s in scales):
        return base

    def log_prob(z, t, cond):
        return target_log_prob(kind, model.logits(z, t), targets, scales)

    return classifier_gradient(base, log_prob_gradient(log_prob), 1.0, schedule)


def chain(schedule, t: int, steps) -> Respaced:
    """The reverse-process grid from model timestep ``t`` down to clean data: N = ``steps`` timesteps
    round(linspace(0, t, N)) (``"all"``: every timestep 0..t), so level N is z at timestep t."""
    T = schedule.T
    t = int(t)
    if not 1 <= t <= T - 1:
        raise UsageError(f"--t must be in [1, {T - 1}], got {t}")
    if isinstance(steps, str) and steps.strip().lower() == "all":
        n = t + 1
    else:
        try:
            n = int(steps)
        except (TypeError, ValueError):
            raise UsageError(f"--steps must be a number or 'all', got {steps!r}") from None
        if not 1 <= n <= t + 1:
            raise UsageError(f"--steps must be in [1, t + 1 = {t + 1}] for t = {t}, got {n}")
    ts = torch.linspace(0, t, n, dtype=torch.float64).round().long() if n > 1 else torch.tensor([t])
    ts = torch.unique(ts)
    abar = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod[ts]])
    return Respaced(ts, abar)


def reverse(denoiser, z_t: torch.Tensor, grid: Respaced, sampler: str, generator: torch.Generator) -> torch.Tensor:
    """Run the reverse process over ``grid`` from level N (z_t) to level 0: ancestral DDPM steps
    (``sampler="ddpm"``) or deterministic DDIM steps (``"ddim"``)."""
    if sampler not in ("ddpm", "ddim"):
        raise UsageError(f"--sampler must be ddpm or ddim, got {sampler!r}")
    return sample(denoiser, tuple(z_t.shape), grid, noise=z_t, ddpm=sampler == "ddpm", generator=generator)


def counterfactual(model, schedule, z0: torch.Tensor, kind: str, targets: list[Target], scales: list[float],
                   t: int, steps, sampler: str, generator: torch.Generator) -> torch.Tensor:
    """z'_0 for latents z0 [B, c, h, w]: forward-noise to timestep t (q_sample with noise from ``generator``),
    then the guided reverse process."""
    grid = chain(schedule, t, steps)
    noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
    z_t = schedule.q_sample(z0, torch.full((z0.shape[0],), int(t), dtype=torch.int64, device=z0.device), noise)
    return reverse(guided_denoiser(model, schedule, kind, targets, scales), z_t, grid, sampler, generator)
