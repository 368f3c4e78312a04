"""Noise schedules, forward noising and timestep respacing.

Forward process (Ho et al. 2020): with betas ``beta_t`` for model timesteps ``t = 0 .. T-1``,
``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)`` (written abar_t) and

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

Schedule arrays are computed in float64 and cast to the image dtype only when applied.

LEVEL CONVENTION (the contract every sampler in medcfx uses)
-----------------------------------------------------------
A respaced sampler runs over N model timesteps ``timesteps[0] < ... < timesteps[N-1]`` (a subset of
``0 .. T-1``). We index the states it visits by **levels** k = 0 .. N:

    level 0        x is clean data,                      abar[0] = 1.0
    level k >= 1   x is "x at model timestep timesteps[k-1]",  abar[k] = alphas_cumprod[timesteps[k-1]]

so ``Respaced.abar`` has N + 1 entries. One step always moves between two neighbouring levels k-1 and k,
and both directions of that step call the denoiser at the SAME model timestep ``timesteps[k-1]``
(``Respaced.t_of(k)``):

    decode  level k -> k-1:  eps = denoiser(x_k,     timesteps[k-1])   (the usual DDIM step)
    encode  level k-1 -> k:  eps = denoiser(x_{k-1}, timesteps[k-1])   (DDIM inversion)

Encoding "L steps" therefore ends at level L, and decoding "L steps" starts at level L: ``decode(encode(x0,
L), L)`` is an exact inverse whenever the denoiser output does not depend on x. This removes the classic
off-by-one of ADM-derived inversion code, which treats the clean image as if it were at the first noisy
timestep, encodes L steps to level L+1, and then starts decoding as if it were at level L.

``Respaced.level_for_fraction(f)`` turns a noise level given as a fraction of the respaced steps into a
level: ``L = round(f * N)`` (e.g. 0.75 of 100 steps -> level 75, model timestep ``timesteps[74]``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from medcfx.errors import UsageError

__all__ = ["BETA_KINDS", "make_betas", "Schedule", "Respaced", "parse_respacing"]

BETA_KINDS = ("linear", "cosine")
_COSINE_S = 0.008
_MAX_BETA = 0.999


def _check_T(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or int(T) < 1:
        raise UsageError(f"diffusion steps T must be a positive integer, got {T!r}")
    return int(T)


def make_betas(kind: str, T: int) -> np.ndarray:
    """Return the float64 betas ``beta_0 .. beta_{T-1}`` of a named schedule.

    - ``"linear"`` (DDPM / ADM): ``np.linspace(1e-4 * 1000/T, 0.02 * 1000/T, T)``; the 1000/T factor keeps
      the total noise comparable when T differs from 1000 (so T must exceed 20, else beta_end >= 1).
    - ``"cosine"`` (Nichol & Dhariwal 2021): with ``f(u) = cos((u + s) / (1 + s) * pi / 2)^2``, s = 0.008,
      ``beta_t = min(1 - f((t+1)/T) / f(t/T), 0.999)``. Before clipping this gives
      ``alphas_cumprod[t] = f((t+1)/T) / f(0)``.
    """
    T = _check_T(T)
    if kind == "linear":
        scale = 1000.0 / T
        if 0.02 * scale >= 1.0:
            raise UsageError(f"linear beta schedule needs T > 20 (beta_end = 0.02 * 1000 / T = {0.02 * scale:g} >= 1)")
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if kind == "cosine":
        u = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((u + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], _MAX_BETA)
    raise UsageError(f"unknown beta schedule {kind!r}; known kinds: {', '.join(BETA_KINDS)}")


def parse_respacing(spec: int | str, T: int) -> list[int]:
    """Model timesteps (ascending) selected by a respacing spec, for a schedule of T steps.

    - ``"ddimN"``: the ADM "ddimN" rule: ``range(0, T, stride)`` for the smallest integer stride >= 1 that
      gives exactly N timesteps (for T=1000, "ddim100" -> 0, 10, ..., 990). No such stride -> UsageError.
    - ``N`` or ``"N"`` (1 <= N <= T): N timesteps spread evenly over ``[0, T-1]`` by the ADM rule for one
      section: a float cursor starts at 0 and advances by ``(T-1)/(N-1)`` (by 1 when N = 1), and each
      timestep is Python's ``round`` of the cursor (round half to even, applied to the accumulated sum,
      exactly as ADM's ``space_timesteps`` does, so recipes written for ADM select the same steps).
    - ``"all"`` (or T): every timestep ``0 .. T-1``.
    """
    T = _check_T(T)
    hint = "expected 'ddimN', an integer N in [1, T] or 'all'"
    if isinstance(spec, bool):
        raise UsageError(f"respacing spec {spec!r}: {hint}")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(T))
        if text.startswith("ddim"):
            digits = text[4:]
            if not digits.isdigit() or int(digits) < 1:
                raise UsageError(f"respacing spec {spec!r}: {hint}")
            n = int(digits)
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == n:
                    return list(range(0, T, stride))
            raise UsageError(f"respacing spec {spec!r}: no integer stride gives exactly {n} of T={T} timesteps")
        if not text.isdigit():
            raise UsageError(f"respacing spec {spec!r}: {hint}")
        spec = int(text)
    if not isinstance(spec, (int, np.integer)):
        raise UsageError(f"respacing spec {spec!r}: {hint}")
    n = int(spec)
    if not 1 <= n <= T:
        raise UsageError(f"respacing spec {spec!r}: N must be in [1, {T}] for T={T}")
    stride = (T - 1) / (n - 1) if n > 1 else 1.0
    cursor, out = 0.0, []
    for _ in range(n):
        out.append(round(cursor))
        cursor += stride
    return out


class Respaced:
    """A respaced sampling grid: N ascending model ``timesteps`` and N + 1 ``abar`` levels.

    ``abar[0] = 1.0`` (clean data, level 0) and ``abar[k] = alphas_cumprod[timesteps[k-1]]`` for k >= 1;
    see the module docstring for the level convention.
    """

    def __init__(self, timesteps: torch.Tensor, abar: torch.Tensor):
        timesteps = torch.as_tensor(timesteps, dtype=torch.int64).reshape(-1).cpu()
        abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1).cpu()
        if timesteps.numel() < 1 or abar.numel() != timesteps.numel() + 1:
            raise UsageError("respaced grid: need N >= 1 timesteps and N + 1 abar levels")
        if bool((timesteps[1:] <= timesteps[:-1]).any()):
            raise UsageError("respaced grid: timesteps must be strictly ascending")
        if abar[0].item() != 1.0 or not bool(((abar[1:] > 0) & (abar[1:] < 1)).all()):
            raise UsageError("respaced grid: abar[0] must be 1 and the other levels in (0, 1)")
        self.timesteps = timesteps
        self.abar = abar

    @property
    def N(self) -> int:
        """Number of respaced steps (levels 1 .. N are noisy)."""
        return int(self.timesteps.numel())

    def t_of(self, k: int) -> int:
        """Model timestep of level k (1 <= k <= N): ``timesteps[k-1]``."""
        if isinstance(k, bool) or not 1 <= int(k) <= self.N:
            raise UsageError(f"level {k!r} has no model timestep; levels with one are 1 .. {self.N}")
        return int(self.timesteps[int(k) - 1])

    def level_for_fraction(self, f: float) -> int:
        """Level for a noise fraction f in [0, 1] of the respaced steps: ``round(f * N)`` (half to even)."""
        f = float(f)
        if not 0.0 <= f <= 1.0:
            raise UsageError(f"noise fraction {f!r} must lie in [0, 1] (e.g. 0.75 = 75% of the steps)")
        return int(round(f * self.N))

    def __repr__(self) -> str:
        return f"Respaced(N={self.N}, timesteps=[{int(self.timesteps[0])} .. {int(self.timesteps[-1])}])"


class Schedule:
    """A discrete variance schedule over model timesteps ``0 .. T-1``.

    ``betas`` and ``alphas_cumprod`` are float64 CPU tensors of shape [T]; ``abar`` / ``q_sample`` cast to
    float32 (or the image dtype) on the caller's device.
    """

    def __init__(self, betas: Sequence[float] | np.ndarray | torch.Tensor):
        b = torch.as_tensor(np.asarray(betas, dtype=np.float64)).reshape(-1)
        if b.numel() < 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise UsageError("schedule betas must be a non-empty sequence of values in (0, 1]")
        self.betas = b
        self.alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
        if not bool((self.alphas_cumprod > 0).all()):
            raise UsageError("schedule betas drive alphas_cumprod to 0; use betas < 1")

    @classmethod
    def create(cls, kind: str = "linear", T: int = 1000) -> "Schedule":
        """``Schedule(make_betas(kind, T))``."""
        return cls(make_betas(kind, T))

    @property
    def T(self) -> int:
        return int(self.betas.numel())

    def _index(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise UsageError(f"timesteps must be an integer tensor, got {t.dtype}")
        idx = t.reshape(-1).to("cpu", torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.T):
            raise UsageError(f"timesteps must lie in [0, {self.T}), got [{int(idx.min())}, {int(idx.max())}]")
        return idx

    def abar(self, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """``alphas_cumprod[t]`` as a float32 tensor of shape [B, 1, ..., 1] (``ndim`` dims) on t's device."""
        a = self.alphas_cumprod[self._index(t)]
        return a.reshape(-1, *([1] * (ndim - 1))).to(device=torch.as_tensor(t).device, dtype=torch.float32)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): ``sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise`` (per sample t)."""
        a = self.alphas_cumprod[self._index(t)].reshape(-1, *([1] * (x0.dim() - 1)))
        c0 = a.sqrt().to(device=x0.device, dtype=x0.dtype)
        c1 = (1.0 - a).sqrt().to(device=x0.device, dtype=x0.dtype)
        return c0 * x0 + c1 * noise

    def respace(self, spec: int | str) -> Respaced:
        """The respaced grid of a spec ("ddimN", N, "N", "all"); see ``parse_respacing``."""
        ts = torch.tensor(parse_respacing(spec, self.T), dtype=torch.int64)
        abar = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[ts]])
        return Respaced(ts, abar)

    def __repr__(self) -> str:
        return f"Schedule(T={self.T})"
