"""What the diffae handlers (commands.py: explain, grade) and the evaluation (evaluate.py) both use: the
DDIM step counts and the inversion limit a request asks for, and the reconstruction errors of an image pair.

Kept below both so that the plugin's modules import one another as a tree (tests/test_plugin_imports.py).
"""

from __future__ import annotations

import math

import numpy as np

from medcfx.errors import UsageError

from medcfx_diffae import quality as cq


def sampling_steps(request, loaded) -> tuple[int, int]:
    """(encode, decode) DDIM steps: --encode-steps / --decode-steps, else the model's ``sample`` settings
    (paper 250 / 100); each in [1, T]."""
    enc = int(request.options.get("encode_steps") or loaded.sample.get("encode_steps", 250))
    dec = int(request.options.get("decode_steps") or loaded.sample.get("decode_steps", 100))
    for flag, v in (("--encode-steps", enc), ("--decode-steps", dec)):
        if not 1 <= v <= loaded.schedule.T:
            raise UsageError(f"{flag} must be in [1, {loaded.schedule.T}], got {v}")
    return enc, dec


def inversion_limit(request) -> float:
    """--inversion-limit (default configs.INVERSION_LIMIT)."""
    return float(request.options.get("inversion_limit") or cq.INVERSION_LIMIT)


def recon_errors(x: np.ndarray, y: np.ndarray) -> dict:
    """MSE, MAE (model units, images in [-1, 1]) and PSNR = 10 log10(2^2 / MSE) of one image pair."""
    diff = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    mse = float(np.mean(diff ** 2))
    return {"mse": mse, "mae": float(np.mean(np.abs(diff))),
            "psnr_db": float(10 * math.log10(4.0 / mse)) if mse > 0 else math.inf}
