"""The thresholding baseline (Meissen et al. 2021), built as a careful user would build it (issue 18).

Meissen et al. showed that the FLAIR intensity itself, thresholded, beats many learned anomaly detectors on
BraTS (the Sanchez paper's Table 1: 66.7 ideal Dice). medcfx's ``threshold`` map of a slice is

    u = x / median(x over the case's foreground)      (per case and channel: ``preprocess.percentile: 50``,
                                                        ``preprocess.clip: false``; no upper clip)
    map = median_filter(u, k x k in-plane)             (``--median-filter k``, default 5; 1 = none)

at the input's NATIVE resolution (``preprocess.size: 0``: each case at its own in-plane size, so nothing is
resampled) of one channel: ``--channel NAME``, or ``--channel auto`` with ``evaluate --val VAL``, which
scores every channel on the validation cases and keeps the one of best pixel AP (FLAIR for hyperintense
lesions, T2 where lesions are dark in FLAIR ...). The choices against the older baseline (99th percentile,
clipped, 64 px) were measured (docs/methods/sanchez.md, "The thresholding baseline").
"""

from __future__ import annotations

import numpy as np
import torch

from medcfx.errors import UsageError
from medcfx.method import Option

MEDIAN_FILTER = 5
PREPROCESS = {"size": 0, "percentile": 50.0, "clip": False}  # native size, median normalisation, no clip

OPTIONS = [
    Option("channel", str, None, "channel thresholded: a modality name, or auto (evaluate with --val: the channel "
                                 "of best validation pixel AP); default flair, else the last"),
    Option("median_filter", int, MEDIAN_FILTER, "in-plane median filter of the map, k x k slice pixels (the "
                                                "input's at the native size), odd k (1: none)", bounds="[1, 31]"),
]


class ThresholdMapper:
    """x [b, C, S, S] in [-1, 1] -> (None, map [b, S, S]): channel ``channel``'s normalised intensity
    (x + 1) / 2 = u, median-filtered k x k per slice (scipy.ndimage, border mode "nearest")."""

    params = None
    flips = None
    entry = None

    def __init__(self, median_filter: int = MEDIAN_FILTER, size: int = 0):
        if not 1 <= median_filter <= 31 or median_filter % 2 == 0:
            raise UsageError(f"--median-filter must be an odd number of pixels in [1, 31] (a centred window), got "
                             f"{median_filter}")
        self.k = int(median_filter)
        self.size = int(size)  # preprocess.size of the slices it maps (0: native)

    def describe(self, channel: str) -> dict:
        """The settings a threshold map was made with (provenance, reports)."""
        return {"channel": channel, "median_filter": self.k, "size": "native" if self.size == 0 else self.size}

    def self_check(self, case, n_slices: int, batch_size: int) -> None:
        return None  # nothing is sampled

    def __call__(self, x: torch.Tensor, channel: int):
        u = (x[:, channel].float() + 1) / 2
        if self.k > 1:
            from scipy.ndimage import median_filter

            u = torch.from_numpy(median_filter(u.cpu().numpy(), size=(1, self.k, self.k), mode="nearest"))
        return None, u


def channel_index(channels: list[str], wanted: str | None) -> int:
    """The index of the named channel; default flair, else the last. UsageError for an unknown name or "auto"
    (resolved by :func:`choose_channel` first)."""
    if wanted == "auto":
        raise UsageError("--channel auto is chosen on validation data: use `medcfx evaluate threshold --val VAL "
                         "--channel auto` and give the channel it reports to explain")
    if wanted is not None:
        if wanted not in channels:
            raise UsageError(f"--channel {wanted}: the input's channels are {', '.join(channels)}")
        return channels.index(wanted)
    return channels.index("flair") if "flair" in channels else len(channels) - 1


def choose_channel(channels: list[str], val, score_channel) -> tuple[str, dict]:
    """``--channel auto``: the channel of best pixel AP on the validation cases ``val``
    (``score_channel(name, val) -> pixel AP``); returns (name, {channel: AP}). UsageError without --val."""
    if val is None:
        raise UsageError("--channel auto chooses the channel on validation data: give --val VALIDATION_SET")
    ap = {name: float(score_channel(name, val)) for name in channels}
    finite = {k: v for k, v in ap.items() if np.isfinite(v)}
    if not finite:
        raise UsageError(f"--channel auto: no channel has a pixel AP on {val} (no lesion voxel?)")
    return max(finite, key=finite.get), ap
