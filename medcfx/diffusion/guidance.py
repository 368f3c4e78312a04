"""Guidance: functions that wrap a denoiser and return a denoiser (so they compose).

- ``classifier_free`` (Ho & Salimans 2021; Sanchez et al. 2022, Alg. 1):
      eps = eps(x, t, null) + w (eps(x, t, c) - eps(x, t, null)) = w eps(c) + (1 - w) eps(null).
  w is ``scale`` in the convention of Sanchez et al.: w = 1 is the plain conditional model. Ho & Salimans
  write the same combination as (1 + w') eps(c) - w' eps(null), so ``scale`` = 1 + w' (sanchez's default
  w = 3 is their w' = 2; their unguided w' = 0 is scale 1).
  Both branches are evaluated in ONE batched call of size 2B: x and t repeated, ``cond[key]`` followed by
  the null label, every other cond entry repeated (all cond entries are batch-first). w = 1 calls only
  the conditional branch, w = 0 only the null branch.
- ``guidance_interval`` (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample
  and distribution quality in diffusion models"): a guided denoiser at model timesteps t_lo <= t <= t_hi,
  an unguided one elsewhere (for classifier-free guidance the conditional branch alone, w = 1: one forward
  of size B instead of 2B). They found guidance unnecessary at low noise and harmful at high noise; for
  medcfx it is a speed lever, with its measured cost in Dice in docs/speed.md.
- ``InversionRecord``: classifier-free guidance whose null branch is the prediction the inversion (encode)
  made at the same timestep, so a guided decode step costs one forward of B (medcfx's speed lever, not in
  Sanchez et al.; ``--reuse-inversion``).
- ``classifier_gradient`` (Dhariwal & Nichol 2021, eq. 14):
      eps' = eps - s sqrt(1 - abar_t) grad_x log p(y | x_t),
  with abar_t = ``schedule.abar(t)`` for the model timestep t the denoiser is called with.
- ``log_prob_gradient`` turns a classifier function (x, t, cond) -> log p(target | x_t) per sample [B] into
  the gradient callable ``classifier_gradient`` needs (autograd through the classifier only).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from medcfx.diffusion.ddim import Denoiser
from medcfx.errors import UsageError

__all__ = ["InversionRecord", "classifier_free", "classifier_gradient", "guidance_interval", "log_prob_gradient"]

GradLogProb = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


def classifier_free(denoiser: Denoiser, scale: float, null_label: int | torch.Tensor, key: str = "y") -> Denoiser:
    """Classifier-free guidance with scale w towards ``cond[key]``: w eps(c) + (1 - w) eps(null), i.e. w = 1 +
    Ho & Salimans' guidance weight (see the module docstring). ``null_label`` is the unconditional value of
    ``cond[key]`` (an int label index, or a tensor broadcastable to ``cond[key]``). Raises UsageError when
    ``cond`` lacks ``key``."""
    w = float(scale)

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if key not in cond:
            raise UsageError(f"classifier-free guidance needs the condition {key!r}; got {sorted(cond)}")
        y = cond[key]
        null = torch.as_tensor(null_label, dtype=y.dtype, device=y.device).expand_as(y)
        if w == 1.0:
            return denoiser(x, t, cond)
        if w == 0.0:
            return denoiser(x, t, {**cond, key: null})
        both = {k: torch.cat([v, v]) for k, v in cond.items() if k != key}
        both[key] = torch.cat([y, null])
        eps = denoiser(torch.cat([x, x]), torch.cat([t, t]), both)
        eps_c, eps_null = eps.chunk(2)
        return eps_null + w * (eps_c - eps_null)

    return guided


def guidance_interval(guided: Denoiser, unguided: Denoiser, t_lo: float, t_hi: float) -> Denoiser:
    """``guided`` at model timesteps t_lo <= t <= t_hi (inclusive), ``unguided`` elsewhere; a batch whose
    samples' timesteps fall on both sides is mixed per sample (both evaluated). Raises UsageError when
    t_lo > t_hi."""
    lo, hi = float(t_lo), float(t_hi)
    if not lo <= hi:
        raise UsageError(f"guidance interval must have t_lo <= t_hi, got ({t_lo}, {t_hi})")

    def within(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inside = (t >= lo) & (t <= hi)
        if bool(inside.all()):
            return guided(x, t, cond)
        if not bool(inside.any()):
            return unguided(x, t, cond)
        mask = inside.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, guided(x, t, cond), unguided(x, t, cond))

    return within


class InversionRecord:
    """A denoiser wrapper for ``--reuse-inversion``: while the encode runs, it keeps the (raw) null-label
    prediction of the last call at each model timestep; :meth:`guided` is then classifier-free guidance
    whose null branch at a recorded timestep is that prediction, so each such decode step costs one forward
    of B (the healthy branch) instead of 2B. At a timestep the encode did not evaluate, both branches run.

    The recorded prediction is the null branch at the encode's point of that level, not at the decode's: the
    approximation DDIM inversion itself makes (eps(x_{k-1}, t_k) for eps(x_k, t_k)), here applied to the null
    branch of the decode, which differs from the encode where guidance has moved the image (the lesion). Not in
    Sanchez et al.'s Alg. 1; its measured cost is in docs/speed.md. The wrapped calls must be batch-first
    with one timestep per batch (as the encode/decode loops make them)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.eps: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond):
        eps = self.denoiser(x, t, cond)
        if bool((t == t[0]).all()):
            self.eps[int(t[0])] = eps
        return eps

    def guided(self, scale: float, null_label: int) -> Denoiser:
        """Classifier-free guidance with scale w (as :func:`classifier_free`) reusing the recorded null
        predictions."""
        w = float(scale)
        both = classifier_free(self.denoiser, w, null_label)

        def guided(x: torch.Tensor, t: torch.Tensor, cond):
            eps_null = self.eps.get(int(t[0])) if bool((t == t[0]).all()) else None
            if eps_null is None or eps_null.shape != x.shape or w in (0.0, 1.0):
                return both(x, t, cond)
            return eps_null + w * (self.denoiser(x, t, cond) - eps_null)

        return guided


def classifier_gradient(denoiser: Denoiser, grad_log_prob: GradLogProb, scale: float, schedule) -> Denoiser:
    """Classifier guidance: eps' = eps - scale * sqrt(1 - abar_t) * grad_log_prob(x_t, t, cond).

    ``schedule`` is anything with ``abar(t, ndim)`` mapping model timesteps to alphas_cumprod (a Schedule).
    """
    s = float(scale)

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        eps = denoiser(x, t, cond)
        if s == 0.0:
            return eps
        grad = grad_log_prob(x, t, cond)
        if grad.shape != x.shape:
            raise UsageError(f"classifier gradient has shape {tuple(grad.shape)}, expected {tuple(x.shape)}")
        a = schedule.abar(t, x.dim()).to(device=x.device, dtype=torch.float64)
        coef = (s * (1.0 - a).sqrt()).to(eps.dtype)
        return eps - coef * grad.to(eps.dtype)

    return guided


def log_prob_gradient(
    classifier_fn: Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor],
) -> GradLogProb:
    """Build grad(x, t, cond) = d/dx sum_b log p(target_b | x_t[b]) from classifier_fn -> [B] log-probs.

    Gradients are taken with respect to a detached copy of x (``requires_grad_``), with grad mode enabled
    even inside a ``torch.no_grad`` sampling loop; the result is detached.
    """

    def grad(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            log_p = classifier_fn(xg, t, cond)
            if log_p.shape != (x.shape[0],):
                raise UsageError(f"classifier log-prob has shape {tuple(log_p.shape)}, expected ({x.shape[0]},)")
            (g,) = torch.autograd.grad(log_p.sum(), xg)
        return g.detach()

    return grad
