"""Localisation and detection metrics, streamed so a whole test set never has to sit in memory.

Pixel level (over every pixel of the test set, as in Sanchez et al. and Baugh et al.):

- ``pixel_AUPRC``: average precision, AP = sum_k (R_k - R_{k-1}) P_k over decreasing thresholds (the
  step-wise definition of scikit-learn's ``average_precision_score``).
- ``pixel_ideal_Dice``: the best Dice over all thresholds, Dice = 2 TP / (2 TP + FP + FN) ("ideal Dice").

Both come from two histograms (lesion / background pixel counts per score bin). The bins are an
order-preserving quantisation of float32 scores by their bit pattern: the top ``bits`` bits of the
monotone 32-bit key, so there is no score range to guess and the relative resolution is
2^-(bits - 9) (``bits=22``: about 1.2e-4 relative, 4M bins, 64 MB of counts whatever the test set size).
Metrics computed from the bins are exact for the quantised scores; against the raw scores they differ
only by ties created within a bin (checked against scikit-learn and a brute-force Dice in the tests).
-0.0 and +0.0 share a bin (they are one tie for scikit-learn too). ``bin_lower_edge`` and
``threshold_flagging_from`` turn a bin into a threshold for ``score >= t`` / ``score > t``; thresholds at
a false-positive rate, per-case metrics and bootstrap intervals build on these bins in
``medcfx.operating_points`` and ``medcfx.case_metrics``.

Image level: ``image_AUROC`` / ``image_AP`` of one score per image (e.g. the heatmap mean), computed with
scikit-learn from the (small) list of per-image scores.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BITS = 22


def _keys(scores: np.ndarray, bits: int) -> np.ndarray:
    """Monotone integer keys of float32 scores, truncated to ``bits`` bits: int64 [n] in [0, 2^bits).

    -0.0 and +0.0 compare equal, so both get the key of +0.0 (their bit patterns differ; binning them apart
    ranked ties apart, unlike scikit-learn).
    """
    f = np.ascontiguousarray(scores, dtype=np.float32).ravel()
    if not np.isfinite(f).all():
        raise ValueError("scores contain NaN or infinity")
    f = np.where(f == 0, np.float32(0.0), f)  # -0.0 -> +0.0
    u = f.view(np.uint32)
    # negative floats: flip all bits; positive: set the sign bit -> unsigned order == float order
    key = np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))
    return (key >> np.uint32(32 - bits)).astype(np.int64)


class PixelMetrics:
    """Streaming pixel-level AUPRC and ideal Dice: ``update(scores, mask)`` per batch, then ``compute()``."""

    def __init__(self, bits: int = DEFAULT_BITS):
        if not 8 <= bits <= 26:
            raise ValueError("bits must be in [8, 26]")
        self.bits = bits
        self.pos = np.zeros(1 << bits, dtype=np.int64)
        self.neg = np.zeros(1 << bits, dtype=np.int64)

    def update(self, scores, mask, valid=None) -> None:
        """Add pixels: ``scores`` float, ``mask`` boolean lesion mask of the same shape; ``valid`` optional
        boolean mask of the pixels to count (e.g. the brain), default all."""
        scores = np.asarray(scores)
        mask = np.asarray(mask).astype(bool)
        if scores.shape != mask.shape:
            raise ValueError(f"scores {scores.shape} and mask {mask.shape} differ in shape")
        if valid is not None:
            valid = np.asarray(valid).astype(bool)
            scores, mask = scores[valid], mask[valid]
        keys = _keys(scores, self.bits)
        m = mask.ravel()
        n = 1 << self.bits
        self.pos += np.bincount(keys[m], minlength=n)
        self.neg += np.bincount(keys[~m], minlength=n)

    def merge(self, other: "PixelMetrics") -> None:
        if other.bits != self.bits:
            raise ValueError("cannot merge metrics with different bin counts")
        self.pos += other.pos
        self.neg += other.neg

    def _curve(self):
        nz = np.nonzero(self.pos + self.neg)[0][::-1]  # occupied bins, highest score first
        tp = np.cumsum(self.pos[nz])
        fp = np.cumsum(self.neg[nz])
        return tp, fp, int(self.pos.sum())

    def compute(self) -> dict:
        tp, fp, n_pos = self._curve()
        if n_pos == 0:
            return {"pixel_AUPRC": math.nan, "pixel_ideal_Dice": math.nan, "pixel_best_threshold_rank": None,
                    "pixels": int(self.neg.sum()), "lesion_pixels": 0}
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / n_pos
        ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
        dice = 2 * tp / (tp + fp + n_pos)
        best = int(np.argmax(dice))
        return {"pixel_AUPRC": ap, "pixel_ideal_Dice": float(dice[best]),
                "pixels": int(self.pos.sum() + self.neg.sum()), "lesion_pixels": n_pos,
                "pixel_best_threshold": self.threshold_of(best)}

    def threshold_of(self, rank: int) -> float:
        """The lower edge (as a float) of the ``rank``-th occupied bin from the top: the ideal threshold
        for the rule ``score >= threshold``."""
        nz = np.nonzero(self.pos + self.neg)[0][::-1]
        return bin_lower_edge(int(nz[rank]), self.bits)


def bin_lower_edge(b: int, bits: int) -> float:
    """The smallest float32 whose ``bits``-bit key is bin ``b`` (as a Python float): score >= edge <=>
    key(score) >= b, for finite float32 scores (bin 2^bits - 1 upwards of +inf has no finite member)."""
    if not 0 <= b < (1 << bits):
        raise ValueError(f"bin {b} outside [0, 2^{bits})")
    key = np.uint32(b << (32 - bits))
    u = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def threshold_flagging_from(b: int, bits: int) -> float:
    """The float32 threshold t (as a Python float) with ``score > t`` <=> key(score) >= b for every finite
    float32 score: the largest float32 below bin b's lower edge (-inf for the lowest finite bins).

    This is how a bin boundary of the histograms becomes a threshold for the strict rule ``score > t``
    used by medcfx.operating_points. The largest float below the edge +0.0 is the negative denormal
    -1.4e-45 (not -0.0, which equals +0.0).
    """
    edge = np.float32(bin_lower_edge(b, bits))
    return float(np.nextafter(edge, np.float32(-np.inf)))


def image_metrics(scores, labels) -> dict:
    """image_AUROC and image_AP of per-image scores against binary labels (NaN if one class is absent)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return {"image_AUROC": math.nan, "image_AP": math.nan, "images": int(len(labels))}
    return {"image_AUROC": float(roc_auc_score(labels, scores)),
            "image_AP": float(average_precision_score(labels, scores)), "images": int(len(labels))}


def dice(pred, mask) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    pred, mask = np.asarray(pred, bool), np.asarray(mask, bool)
    denom = pred.sum() + mask.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, mask).sum() / denom)
