"""DDIM / DDPM steps and the encode, decode and sample loops over a respaced grid.

Notation: ``a_k`` = abar of level k, ``a_prev`` = abar of level k-1 (``Respaced.abar``; level 0 is clean
data with abar = 1). Every abar argument may be a Python float or a tensor broadcastable to x
(e.g. [B, 1, 1, 1]); coefficients are computed in float64 and cast to x's dtype when applied.

The steps (one function per algorithm, a caller may loop over them itself):

- ``predict_x0``:  x0 = (x_k - sqrt(1 - a_k) eps) / sqrt(a_k)
- ``eps_from_x0``: eps = (x_k - sqrt(a_k) x0) / sqrt(1 - a_k)
- ``ddim_step`` (Song et al. 2021, eq. 12):
      x_{k-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
      sigma = eta sqrt((1 - a_prev) / (1 - a_k)) sqrt(1 - a_k / a_prev)
- ``ddim_inverse_step`` (eta = 0): x_k = sqrt(a_k) x0(x_prev, eps, a_prev) + sqrt(1 - a_k) eps
- ``ddpm_step``: ancestral sample of q(x_{k-1} | x_k, x0) with the respaced beta_k = 1 - a_k / a_prev:
      mean = sqrt(a_prev) beta_k / (1 - a_k) x0 + sqrt(1 - beta_k) (1 - a_prev) / (1 - a_k) x_k
           = (x_k - beta_k / sqrt(1 - a_k) eps) / sqrt(1 - beta_k)
      var  = beta_k (1 - a_prev) / (1 - a_k)            (0 when a_prev = 1)

The linear updates are applied in the algebraically identical form ``c_x * x + c_eps * eps`` with the
coefficients folded in float64, which avoids the float32 loss of dividing by sqrt(a_k) ~ 0.006 at high noise.

``dpmpp2m_step`` (DPM-Solver++(2M), Lu et al. 2022, Alg. 2; data prediction x0, lambda = log(alpha / sigma),
alpha = sqrt(a), sigma = sqrt(1 - a), h = lambda_to - lambda_from, r = h_prev / h):
      D = x0 + (x0 - x0_prev) / (2 r)          (D = x0 on the first step: it is then the DDIM step)
      x_to = (sigma_to / sigma_from) x_from + alpha_to (1 - exp(-h)) D
  and x_to = D's first-order value x0 when a_to = 1 (the last step to clean data). The same update with
  h < 0 is the second-order inversion used by ``encode(..., solver="dpm++2m")``.

``dpmpp3m_step`` (DPM-Solver++(3M), the third-order multistep of Lu et al. 2022; x0 at the current point m0
and the two before, m1, m2, with step lengths h0 = lambda(m0) - lambda(m1), h1 = lambda(m1) - lambda(m2),
r0 = h0 / h, r1 = h1 / h):
      D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1
      D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)  (= h x0'),  D2 = 2 (D1_0 - D1_1) / (r0 + r1)  (= h^2 x0'')
      phi1 = expm1(-h),  phi2 = phi1 / h + 1,  phi3 = phi2 / h - 1/2
      x_to = (sigma_to / sigma_from) x - alpha_to phi1 m0 + alpha_to phi2 D1 - alpha_to phi3 D2
  i.e. the exponential integrator x_to = (sigma_to / sigma_from) x + alpha_to int e^(lambda - lambda_to) x0(lambda)
  dlambda with x0 quadratic in lambda through the three points (exact for such x0: tested against quadrature;
  the x0'' term's factor 2 is derived there). With one earlier x0 it is the 2M step, with none the DDIM step.

``predict_eps`` is the single place where the denoiser is evaluated: eps = denoiser(x, t, cond); if an
``x0_process`` (see ``normalize.py``) is given, x0 = x0_process(predict_x0(x, eps, a)) and eps is
re-derived from the processed x0 (``eps_from_x0``) so that the update is consistent with it.

Loops follow the level convention of ``schedule.py``: the step between levels k-1 and k always calls the
denoiser at model timestep ``respaced.timesteps[k-1]``, in both directions.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Mapping, Optional

import torch

from medcfx.diffusion.schedule import Respaced
from medcfx.errors import UsageError

__all__ = [
    "Denoiser",
    "X0Process",
    "predict_x0",
    "eps_from_x0",
    "ddim_step",
    "ddim_inverse_step",
    "ddpm_step",
    "dpmpp2m_step",
    "dpmpp3m_step",
    "SOLVERS",
    "predict_eps",
    "encode",
    "decode",
    "sample",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
X0Process = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None]

SOLVERS = ("ddim", "dpm++2m", "dpm++3m")


def _f64(a) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def _cast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(device=like.device, dtype=like.dtype)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = _f64(abar_t)
    return _cast(1.0 / a.sqrt(), x_t) * x_t - _cast(((1.0 - a) / a).sqrt(), x_t) * eps


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar_t) -> torch.Tensor:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)  (abar_t < 1)."""
    a = _f64(abar_t)
    s = (1.0 - a).sqrt()
    return _cast(1.0 / s, x_t) * x_t - _cast(a.sqrt() / s, x_t) * x0


def ddim_step(
    x_k: torch.Tensor,
    eps: torch.Tensor,
    abar_k,
    abar_prev,
    eta: float = 0.0,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One DDIM step from level k to k-1 (Song et al. 2021, eq. 12).

    x_{k-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise, x0 = predict_x0(x_k, eps, a_k),
    sigma = eta * sqrt((1 - a_prev) / (1 - a_k)) * sqrt(1 - a_k / a_prev). eta in [0, 1]; eta = 0 is
    deterministic (``noise`` is ignored), eta = 1 has the DDPM posterior variance. ``noise`` None means 0.
    """
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise UsageError(f"DDIM eta must lie in [0, 1], got {eta}")
    a, ap = _f64(abar_k), _f64(abar_prev)
    sigma = eta * ((1.0 - ap) / (1.0 - a)).sqrt() * (1.0 - a / ap).clamp(min=0.0).sqrt()
    c_eps_dir = (1.0 - ap - sigma**2).clamp(min=0.0).sqrt()
    # sqrt(ap) * x0 + c_eps_dir * eps, with x0 = (x - sqrt(1-a) eps) / sqrt(a), folded:
    c_x = (ap / a).sqrt()
    c_eps = c_eps_dir - (ap * (1.0 - a) / a).sqrt()
    out = _cast(c_x, x_k) * x_k + _cast(c_eps, x_k) * eps
    if noise is not None and eta > 0.0:
        out = out + _cast(sigma, x_k) * noise
    return out


def ddim_inverse_step(x_prev: torch.Tensor, eps: torch.Tensor, abar_prev, abar_k) -> torch.Tensor:
    """Deterministic DDIM inversion step from level k-1 to k (eta = 0).

    x_k = sqrt(a_k) x0 + sqrt(1 - a_k) eps with x0 = predict_x0(x_prev, eps, a_prev) (x0 = x_prev when
    a_prev = 1). This is the exact algebraic inverse of ``ddim_step(x_k, eps, a_k, a_prev, eta=0)`` for the
    same eps.
    """
    a, ap = _f64(abar_k), _f64(abar_prev)
    c_x = (a / ap).sqrt()
    c_eps = (1.0 - a).sqrt() - (a * (1.0 - ap) / ap).sqrt()
    return _cast(c_x, x_prev) * x_prev + _cast(c_eps, x_prev) * eps


def ddpm_step(x_k: torch.Tensor, eps: torch.Tensor, abar_k, abar_prev, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Ancestral DDPM step from level k to k-1 with the posterior q(x_{k-1} | x_k, x0).

    beta_k = 1 - a_k / a_prev (the respaced beta), mean = (x_k - beta_k / sqrt(1 - a_k) eps) / sqrt(1 - beta_k)
    (= the posterior mean with x0 = predict_x0(x_k, eps, a_k)), variance = beta_k (1 - a_prev) / (1 - a_k),
    which is 0 for the last step (a_prev = 1). Returns mean + sqrt(variance) * noise; noise None means 0.
    """
    a, ap = _f64(abar_k), _f64(abar_prev)
    beta = 1.0 - a / ap
    c_x = 1.0 / (1.0 - beta).sqrt()
    c_eps = -beta / ((1.0 - a).sqrt() * (1.0 - beta).sqrt())
    out = _cast(c_x, x_k) * x_k + _cast(c_eps, x_k) * eps
    if noise is not None:
        var = (beta * (1.0 - ap) / (1.0 - a)).clamp(min=0.0)
        out = out + _cast(var.sqrt(), x_k) * noise
    return out


def _lambda(a: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(a / (1 - a)) (a < 1)."""
    return 0.5 * (math.log(a) - math.log1p(-a))


def dpmpp2m_step(
    x: torch.Tensor, x0: torch.Tensor, abar_from: float, abar_to: float, history=None
) -> tuple[torch.Tensor, tuple]:
    """One DPM-Solver++(2M) step from the level with ``abar_from`` (< 1) to ``abar_to``; returns (x_to, history).

    ``x0`` is the data prediction at x (after any x0 processing); ``history`` is what the previous step
    returned (None on the first step, which is then first order and equals the DDIM step). Works in both
    directions (abar_to < abar_from is an inversion step). Stepping to abar_to = 1 returns the first-order
    value x0 (the usual "lower order final" of few-step sampling) and no history.
    """
    a, at = float(abar_from), float(abar_to)
    if at >= 1.0:
        return x0, None
    h = _lambda(at) - _lambda(a)
    d = x0
    if history is not None:
        x0_prev, h_prev = history
        d = x0 + (x0 - x0_prev) * (h / (2.0 * h_prev))
    c_x = math.sqrt((1.0 - at) / (1.0 - a))
    c_d = math.sqrt(at) * -math.expm1(-h)
    return c_x * x + c_d * d, (x0, h)


def dpmpp3m_step(
    x: torch.Tensor, x0: torch.Tensor, abar_from: float, abar_to: float, history=None
) -> tuple[torch.Tensor, tuple]:
    """One DPM-Solver++(3M) step (formula in the module docstring); returns (x_to, history).

    ``history`` is what the previous step returned: a tuple of up to two earlier (x0, h) pairs, most recent
    first (None or () on the first step: first order; one pair: the 2M step). Stepping to abar_to = 1
    returns x0 and an empty history, as :func:`dpmpp2m_step`.
    """
    history = tuple(history or ())
    a, at = float(abar_from), float(abar_to)
    if at >= 1.0:
        return x0, ()
    if len(history) < 2:
        x_to, _ = dpmpp2m_step(x, x0, a, at, history[0] if history else None)
        return x_to, ((x0, _lambda(at) - _lambda(a)),) + history
    h = _lambda(at) - _lambda(a)
    (m1, h0), (m2, h1) = history[0], history[1]
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (x0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
    d2 = (d1_0 - d1_1) * (2.0 / (r0 + r1))
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    alpha = math.sqrt(at)
    c_x = math.sqrt((1.0 - at) / (1.0 - a))
    return c_x * x - (alpha * phi1) * x0 + (alpha * phi2) * d1 - (alpha * phi3) * d2, ((x0, h), history[0])


_MULTISTEP = {"dpm++2m": dpmpp2m_step, "dpm++3m": dpmpp3m_step}


def _final_history(history, k: int):
    """Lower order at the end of a decode (k = the level stepped from): first order into levels 1 and 0 (a
    huge step in lambda next to clean data), at most second order into level 2."""
    if k <= 2 or history is None:
        return None
    return history[:1] if k == 3 and isinstance(history[0], tuple) else history


def check_solver(solver: str, eta: float = 0.0) -> str:
    if solver not in SOLVERS:
        raise UsageError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver != "ddim" and float(eta) > 0.0:
        raise UsageError(f"solver {solver!r} is deterministic: eta must be 0")
    return solver


def predict_eps(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: int | torch.Tensor,
    abar_x,
    cond: Optional[Mapping[str, torch.Tensor]] = None,
    x0_process: Optional[X0Process] = None,
) -> torch.Tensor:
    """eps = denoiser(x, t, cond), made consistent with a processed x0 estimate.

    ``t`` is a model timestep (int, broadcast to [B]) or an int64 tensor [B]; ``abar_x`` is the abar of x's
    own level. With ``x0_process``: x0 = x0_process(predict_x0(x, eps, abar_x)) and
    eps = eps_from_x0(x, x0, abar_x). When abar_x = 1 (clean data, level 0) x is its own x0, so the
    process is not applied and eps is returned as evaluated.
    """
    if not torch.is_tensor(t) or t.dim() == 0:
        t = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
    eps = denoiser(x, t, dict(cond) if cond else {})
    if eps.shape != x.shape:
        raise UsageError(f"denoiser returned shape {tuple(eps.shape)} for an input of shape {tuple(x.shape)}")
    if x0_process is None or bool((_f64(abar_x) >= 1.0).all()):
        return eps
    x0 = x0_process(predict_x0(x, eps, abar_x))
    return eps_from_x0(x, x0, abar_x)


def _check_level(L: int, respaced: Respaced) -> int:
    try:
        value = operator.index(L)
    except TypeError:
        value = None
    if isinstance(L, bool) or value is None or not 0 <= value <= respaced.N:
        raise UsageError(f"number of steps L={L!r} must be an integer in [0, {respaced.N}] for this grid")
    return value


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like x; drawn on the generator's device (so a CPU generator gives the
    same noise on every device) and moved to x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def encode(
    denoiser: Denoiser,
    x0: torch.Tensor,
    respaced: Respaced,
    L: int,
    cond: Optional[Mapping[str, torch.Tensor]] = None,
    x0_process: Optional[X0Process] = None,
    callback: Optional[Callback] = None,
    solver: str = "ddim",
) -> torch.Tensor:
    """Deterministic inversion from level 0 (clean x0) to level L.

    ``solver="ddim"``: for k = 1 .. L, eps = predict_eps(denoiser, x_{k-1}, timesteps[k-1], abar[k-1]) and
    x_k = ddim_inverse_step(x_{k-1}, eps, abar[k-1], abar[k]).
    ``solver="dpm++2m"`` (or ``"dpm++3m"``, the same with the third-order step once two earlier x0 exist):
    the first two steps are the DDIM ones; for k >= 3 the denoiser is evaluated at
    x_{k-1}'s own timestep (timesteps[k-2]), giving x0_{k-1}, and x_k = dpmpp2m_step(...) with the previous
    x0 as history (second order; the same number of network calls). Evaluating at the own level from
    level 1 on, or keeping DDIM's "next timestep" evaluation with the 2M update, were both measurably
    worse on Gaussian data (tests/test_diffusion_ddim.py checks the orders against the exact flow).
    ``callback(k, x_k)`` after each step. L = 0 returns x0 unchanged.
    """
    L = _check_level(L, respaced)
    check_solver(solver)
    x, history = x0, None
    for k in range(1, L + 1):
        a_prev, a_k = respaced.abar[k - 1].item(), respaced.abar[k].item()
        if solver == "ddim" or k <= 2:  # out of levels 0 and 1 (near-clean, a huge step in lambda): DDIM
            eps = predict_eps(denoiser, x, respaced.t_of(k), a_prev, cond, x0_process)
            x = ddim_inverse_step(x, eps, a_prev, a_k)
        else:
            eps = predict_eps(denoiser, x, respaced.t_of(k - 1), a_prev, cond, x0_process)
            x, history = _MULTISTEP[solver](x, predict_x0(x, eps, a_prev), a_prev, a_k, history)
        if callback is not None:
            callback(k, x)
    return x


def decode(
    denoiser: Denoiser,
    x_L: torch.Tensor,
    respaced: Respaced,
    L: int,
    cond: Optional[Mapping[str, torch.Tensor]] = None,
    x0_process: Optional[X0Process] = None,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    solver: str = "ddim",
) -> torch.Tensor:
    """Decoding from level L down to level 0.

    For k = L .. 1: eps = predict_eps(denoiser, x_k, timesteps[k-1], abar[k]), then with
    ``solver="ddim"`` x_{k-1} = ddim_step(x_k, eps, abar[k], abar[k-1], eta, noise) (noise drawn from
    ``generator`` when eta > 0), with ``solver="dpm++2m"`` x_{k-1} = dpmpp2m_step(x_k, x0_k, ...) with
    x0_k = predict_x0(x_k, eps, abar[k]) (eta must be 0; the steps into levels 1 and 0 are first order);
    ``solver="dpm++3m"`` likewise with ``dpmpp3m_step`` (at most second order into level 2).
    ``callback(k-1, x_{k-1})`` after each step.
    L = 0 returns x_L unchanged.
    """
    L = _check_level(L, respaced)
    check_solver(solver, eta)
    x, history = x_L, None
    for k in range(L, 0, -1):
        a_k, a_prev = respaced.abar[k].item(), respaced.abar[k - 1].item()
        eps = predict_eps(denoiser, x, respaced.t_of(k), a_k, cond, x0_process)
        if solver == "ddim":
            noise = _randn_like(x, generator) if float(eta) > 0.0 else None
            x = ddim_step(x, eps, a_k, a_prev, eta, noise)
        else:
            # steps into level 1 (model timestep ~0, a huge step in lambda) and 0 are first order, as the
            # "lower order final" of DPM-Solver (mirrors the first-order first two steps of encode)
            x, history = _MULTISTEP[solver](x, predict_x0(x, eps, a_k), a_k, a_prev, _final_history(history, k))
        if callback is not None:
            callback(k - 1, x)
    return x


def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    respaced: Respaced,
    cond: Optional[Mapping[str, torch.Tensor]] = None,
    x0_process: Optional[X0Process] = None,
    eta: float = 0.0,
    ddpm: bool = False,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    callback: Optional[Callback] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Generate samples from pure noise at level N down to level 0.

    x_N = ``noise`` if given (must have ``shape``) else standard normal from ``generator`` (on ``device``,
    default CPU). Then for k = N .. 1 either ``ddim_step`` (eta) or, with ``ddpm=True``, ``ddpm_step``
    (ancestral; ``eta`` is then ignored), each with eps = predict_eps(denoiser, x_k, timesteps[k-1],
    abar[k]); ``callback(k-1, x_{k-1})`` after each step.
    """
    shape = tuple(int(s) for s in shape)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise UsageError(f"initial noise has shape {tuple(noise.shape)}, expected {shape}")
        x = noise
    else:
        gen_device = generator.device if generator is not None else (device or "cpu")
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        if device is not None:
            x = x.to(device)
    if not ddpm:
        return decode(denoiser, x, respaced, respaced.N, cond, x0_process, eta, generator, callback)
    for k in range(respaced.N, 0, -1):
        a_k, a_prev = respaced.abar[k].item(), respaced.abar[k - 1].item()
        eps = predict_eps(denoiser, x, respaced.t_of(k), a_k, cond, x0_process)
        z = _randn_like(x, generator) if k > 1 else None
        x = ddpm_step(x, eps, a_k, a_prev, z)
        if callback is not None:
            callback(k - 1, x)
    return x
