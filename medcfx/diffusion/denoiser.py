"""The denoiser contract and its torch implementation.

A denoiser is any callable ``denoiser(x, t, cond) -> eps`` with x a float image batch [B, C, H, W], t an
int64 tensor [B] of model timesteps in [0, T) and cond a dict of batch-first tensors (e.g. "y" int64
labels, "cond_image", "z_sem"; possibly empty). eps has x's shape and dtype. ``TorchDenoiser`` wraps an
``nn.Module`` whose forward is ``module(x, t, **cond)``; the ONNX backend (medcfx.export) is the other
implementation.
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import torch

__all__ = ["TorchDenoiser"]


class TorchDenoiser:
    """Call ``module(x, t, **cond)`` as a denoiser.

    - Runs under ``torch.no_grad()`` unless grad mode is on and x requires grad (then gradients flow
      through the module).
    - Floating inputs (x and floating cond entries) are cast to the module's parameter dtype; the output is
      cast back to x's dtype, so a float64 sampling state can drive a float32 model.
    - ``autocast_bf16=True`` runs the forward under ``torch.autocast(x.device.type, torch.bfloat16)`` (CPU or
      GPU); the output is cast back to x's dtype (float32 for float32 inputs).
    """

    def __init__(self, module: torch.nn.Module, autocast_bf16: bool = False):
        self.module = module
        self.autocast_bf16 = bool(autocast_bf16)

    def _param_dtype(self, fallback: torch.dtype) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return fallback

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        dtype = self._param_dtype(x.dtype)
        kwargs = {
            k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in (cond or {}).items()
        }
        track = torch.is_grad_enabled() and x.requires_grad
        grad_ctx = contextlib.nullcontext() if track else torch.no_grad()
        amp_ctx = (
            torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
            if self.autocast_bf16
            else contextlib.nullcontext()
        )
        with grad_ctx, amp_ctx:
            eps = self.module(x.to(dtype), t, **kwargs)
        return eps.to(x.dtype)

    def __repr__(self) -> str:
        return f"TorchDenoiser({type(self.module).__name__}, autocast_bf16={self.autocast_bf16})"
