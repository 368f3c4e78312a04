"""Test-set metrics kept per case, so that 95 % bootstrap confidence intervals over cases are cheap.

``CaseMetrics.update(case_id, scores, lesion, valid)`` streams the maps of a test set (a volume, or a
case's slices in any number of batches); each case keeps a small record, never its pixels:

- a sparse histogram of its scores: the occupied bins of the order-preserving float32 bit-pattern bins of
  :mod:`medcfx.metrics` at ``bits`` bits (default 20: bin width relative 2^-(bits - 9) = 2^-11, about
  4.9e-4 of the score), with lesion and healthy pixel counts per bin. 12 bytes per occupied bin (int32
  bin, lesion count, healthy count), at most min(pixels of the case, 2^bits) bins: typically a few 10^4
  for a brain volume whose scores span a dozen octaves (a few hundred kB), 12 MB in the worst case at 20
  bits. Pooled AP / AUROC / ideal Dice are exact for the quantised scores; against the raw scores the
  error is that of the ties created within a bin (about 1e-4 in AP at 20 bits on smooth score
  distributions; tests/test_case_metrics.py checks against scikit-learn);
- TP, FP, FN at each named threshold (rule ``score > threshold``, float32), exact on the raw scores;
- optional image-level scores and labels (one per volume, or one per slice of the case).

Pooled metrics of any multiset of cases are then sums of those records: a bootstrap resample with case
multiplicities w_c has the pooled histogram sum_c w_c H_c (a sparse matrix product) and pooled counts
sum_c w_c (TP_c, FP_c, FN_c). Point estimates are the same computation with every w_c = 1.

Metric keys (``compute``, ``bootstrap``, ``summary``):

- ``pixel_AUPRC``: average precision over all pixels of the set, the step-wise AP of scikit-learn's
  ``average_precision_score``: sum_k (R_k - R_{k-1}) P_k over decreasing distinct (binned) scores.
- ``pixel_AUROC``: P(s_lesion > s_healthy) + P(=) / 2 over pixel pairs (Mann-Whitney form of the ROC area,
  equal to scikit-learn's trapezoidal ``roc_auc_score`` with ties).
- ``pixel_ideal_Dice_oracle``: max over thresholds of the pooled Dice 2 TP / (2 TP + FP + FN) (Dice 1945),
  the threshold chosen on the test labels themselves: an oracle, not an operating point (re-chosen in
  every bootstrap resample).
- ``pixel_Dice@NAME``: the pooled Dice at threshold NAME (e.g. "fpr5", "valDice" from a Calibration).
- ``volume_Dice_mean@NAME`` / ``volume_Dice_sd@NAME``: mean and sample standard deviation (ddof = 1) over
  cases of the per-case (3D) Dice at threshold NAME. A case without lesion scores 1.0 when nothing is
  flagged and 0.0 otherwise (the usual convention for an empty reference, as in the BraTS evaluation);
  ``counts()["cases_without_lesion"]`` says how many there are.
- ``image_AUROC`` / ``image_AP``: over the image-level scores and labels (scikit-learn definitions).

Undefined values are NaN: pixel metrics without lesion pixels (AUROC also without healthy ones), image
metrics with one class, the SD with fewer than 2 cases.

Bootstrap (Efron & Tibshirani 1993, percentile interval): resample r draws C case indices with replacement,
the rows of ``numpy.random.default_rng(seed).integers(0, C, size=(n_resamples, C))``; the interval is
``numpy.percentile`` (linear interpolation) of the defined resample values at (1 -/+ confidence) / 2.
Resamples where a metric is undefined are skipped and counted (``n_skipped``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping

import numpy as np

from medcfx.metrics import _keys

__all__ = ["DEFAULT_CASE_BITS", "CaseMetrics", "CaseRecord", "metric_label"]

DEFAULT_CASE_BITS = 20
_CHUNK_ELEMENTS = 1 << 21  # resample rows x bins per dense block (16 MB per float64 array)


def metric_label(key: str) -> str:
    """A human label for a metric key of this module (for report tables)."""
    base, _, name = key.partition("@")
    labels = {
        "pixel_AUPRC": "pixel AP (AUPRC)",
        "pixel_AUROC": "pixel AUROC",
        "pixel_ideal_Dice_oracle": "ideal Dice (oracle: threshold chosen on the test labels)",
        "pixel_Dice": "Dice at threshold {}",
        "volume_Dice_mean": "mean per-volume Dice at threshold {}",
        "volume_Dice_sd": "SD of per-volume Dice at threshold {}",
        "image_AUROC": "image AUROC",
        "image_AP": "image AP",
    }
    if base not in labels:
        raise KeyError(key)
    return labels[base].format(name)


@dataclass
class CaseRecord:
    """What one case keeps. ``bins`` int32 [K] ascending occupied histogram bins (``bits``-bit keys),
    ``pos`` / ``neg`` int32 [K] lesion / healthy pixel counts per bin; ``at`` maps a threshold name to int64
    [3] = (TP, FP, FN) pixel counts at ``score > threshold``; ``image_scores`` float64 [m] and
    ``image_labels`` bool [m] the case's image-level scores (m may be 0)."""

    case_id: str
    bins: np.ndarray
    pos: np.ndarray
    neg: np.ndarray
    at: dict[str, np.ndarray]
    image_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    image_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def pixels(self) -> int:
        return int(self.pos.sum(dtype=np.int64) + self.neg.sum(dtype=np.int64))

    @property
    def lesion_pixels(self) -> int:
        return int(self.pos.sum(dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.bins.nbytes + self.pos.nbytes + self.neg.nbytes)


def _dice(tp, fp, fn, empty):
    """2 TP / (2 TP + FP + FN) elementwise; ``empty`` where the denominator is 0."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), empty)


def _curves(P: np.ndarray, N: np.ndarray):
    """AP, AUROC and ideal Dice of each row of weighted histograms P (lesion) and N (healthy), [r, G] with
    columns in ascending score order. Returns three float64 [r] arrays (NaN where undefined)."""
    tp = np.cumsum(P[:, ::-1], axis=1)  # thresholds at decreasing scores: flag the columns >= k
    fp = np.cumsum(N[:, ::-1], axis=1)
    npos, nneg = tp[:, -1], fp[:, -1]
    flagged = tp + fp
    prec = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(npos > 0, (P[:, ::-1] * prec).sum(1) / npos, np.nan)
        neg_below = np.cumsum(N, axis=1) - N
        auc = (P * (neg_below + 0.5 * N)).sum(1) / (npos * nneg)
        auc = np.where((npos > 0) & (nneg > 0), auc, np.nan)
        ideal = np.where(npos > 0, (2 * tp / (flagged + npos[:, None])).max(1, initial=0.0), np.nan)
    return ap, auc, ideal


class _Hist:
    """Per-case histograms as sparse [C, G] matrices over the union of their columns (ascending)."""

    def __init__(self, cols: list[np.ndarray], pos: list[np.ndarray], neg: list[np.ndarray]):
        from scipy import sparse

        union = np.unique(np.concatenate(cols)) if cols else np.zeros(0, np.int64)
        indptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int64)
        indices = np.concatenate([np.searchsorted(union, c) for c in cols]) if cols else np.zeros(0, np.int64)
        shape = (len(cols), len(union))
        self.width = len(union)
        self.pos = sparse.csr_matrix((np.concatenate(pos).astype(np.float64) if cols else [], indices, indptr),
                                     shape=shape)
        self.neg = sparse.csr_matrix((np.concatenate(neg).astype(np.float64) if cols else [], indices, indptr),
                                     shape=shape)

    def curves(self, W: np.ndarray):
        """AP, AUROC, ideal Dice [r] of the pooled histograms W @ H for case weights W [r, C]."""
        out = [np.full(len(W), np.nan) for _ in range(3)]
        if self.width == 0:
            return out
        step = max(1, _CHUNK_ELEMENTS // max(1, self.width))
        for a in range(0, len(W), step):
            w = np.ascontiguousarray(W[a:a + step].T)
            P = np.ascontiguousarray(np.asarray(self.pos.T @ w).T)
            N = np.ascontiguousarray(np.asarray(self.neg.T @ w).T)
            for o, v in zip(out, _curves(P, N)):
                o[a:a + step] = v
        return out


class CaseMetrics:
    """Streaming per-case test-set metrics; see the module docstring for definitions and resolution.

    ``thresholds``: name -> threshold (finite float, rule ``score > threshold``), fixed before streaming,
    e.g. ``Calibration.thresholds()``. ``bits``: histogram resolution, in [12, 24].
    """

    def __init__(self, thresholds: Mapping[str, float] | None = None, bits: int = DEFAULT_CASE_BITS):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 12 <= bits <= 24:
            raise ValueError(f"bits must be an integer in [12, 24], got {bits!r}")
        self.bits = bits
        self.thresholds: dict[str, float] = {}
        for name, t in (thresholds or {}).items():
            if not isinstance(name, str) or not name or "@" in name:
                raise ValueError(f"threshold name must be a non-empty string without '@', got {name!r}")
            if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not math.isfinite(float(t)):
                raise ValueError(f"threshold {name!r} must be a finite number, got {t!r}")
            self.thresholds[name] = float(t)
        self._cases: dict[str, CaseRecord] = {}

    def _record(self, case_id: str) -> CaseRecord:
        if not isinstance(case_id, str) or not case_id:
            raise ValueError(f"case_id must be a non-empty string, got {case_id!r}")
        if case_id not in self._cases:
            empty = np.zeros(0, np.int32)
            self._cases[case_id] = CaseRecord(case_id, empty, empty, empty,
                                              {k: np.zeros(3, np.int64) for k in self.thresholds})
        return self._cases[case_id]

    def update(self, case_id: str, scores, lesion, valid=None) -> None:
        """Add pixels of case ``case_id``: ``scores`` float array (any shape; compared as float32),
        ``lesion`` boolean lesion mask of the same shape, ``valid`` optional boolean mask of the pixels to
        count (e.g. the brain; default all). May be called several times per case (e.g. per slice batch)."""
        s = np.asarray(scores)
        m = np.asarray(lesion).astype(bool)
        if s.shape != m.shape:
            raise ValueError(f"scores {s.shape} and lesion mask {m.shape} differ in shape")
        if valid is not None:
            v = np.asarray(valid).astype(bool)
            if v.shape != s.shape:
                raise ValueError(f"valid mask {v.shape} and scores {s.shape} differ in shape")
            s, m = s[v], m[v]
        s = s.astype(np.float32).ravel()
        m = m.ravel()
        keys = _keys(s, self.bits)  # refuses NaN / inf
        rec = self._record(case_id)
        if rec.pixels + s.size >= 2**31:
            raise ValueError(f"case {case_id!r}: more than 2^31 - 1 pixels")
        combined, counts = np.unique((keys << 1) | m, return_counts=True)
        bins = np.concatenate([rec.bins, (combined >> 1).astype(np.int32)])
        lesion_counts = np.concatenate([rec.pos, np.where(combined & 1, counts, 0)])
        healthy_counts = np.concatenate([rec.neg, np.where(combined & 1, 0, counts)])
        rec.bins, inverse = np.unique(bins, return_inverse=True)
        rec.bins = rec.bins.astype(np.int32)
        rec.pos = np.bincount(inverse, weights=lesion_counts, minlength=len(rec.bins)).astype(np.int32)
        rec.neg = np.bincount(inverse, weights=healthy_counts, minlength=len(rec.bins)).astype(np.int32)
        for name, t in self.thresholds.items():
            flagged = s > np.float32(t)
            tp = int(np.count_nonzero(flagged & m))
            rec.at[name] += (tp, int(np.count_nonzero(flagged)) - tp, int(np.count_nonzero(m)) - tp)

    def add_images(self, case_id: str, scores, labels) -> None:
        """Add image-level scores (float, finite) and binary labels of case ``case_id`` (1-D, same length):
        one per volume, or one per slice; the bootstrap resamples them with their case."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        y = np.asarray(labels).ravel()
        if s.shape != y.shape:
            raise ValueError(f"{s.size} image scores but {y.size} labels")
        if not np.isfinite(s).all():
            raise ValueError("image scores contain NaN or infinity")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("image labels must be 0/1 or booleans")
        rec = self._record(case_id)
        rec.image_scores = np.concatenate([rec.image_scores, s])
        rec.image_labels = np.concatenate([rec.image_labels, y.astype(bool)])

    @property
    def records(self) -> list[CaseRecord]:
        """The case records, in the order cases were first seen."""
        return list(self._cases.values())

    # -- evaluation for case weights ---------------------------------------------------------------------

    def _prepare(self):
        recs = self.records
        if not recs:
            raise ValueError("no cases to evaluate")
        pixels = _Hist([r.bins for r in recs], [r.pos for r in recs], [r.neg for r in recs])
        all_scores = np.concatenate([r.image_scores for r in recs])
        groups = np.unique(all_scores)
        cols, ipos, ineg = [], [], []
        for r in recs:
            g, inv = np.unique(np.searchsorted(groups, r.image_scores), return_inverse=True)
            cols.append(g)
            ipos.append(np.bincount(inv, weights=r.image_labels.astype(np.float64), minlength=len(g)))
            ineg.append(np.bincount(inv, weights=(~r.image_labels).astype(np.float64), minlength=len(g)))
        images = _Hist(cols, ipos, ineg)
        at = {k: np.stack([r.at[k] for r in recs]).astype(np.float64) for k in self.thresholds}
        case_dice = {k: _dice(a[:, 0], a[:, 1], a[:, 2], empty=1.0) for k, a in at.items()}
        return pixels, images, at, case_dice

    def _evaluate(self, W: np.ndarray, prepared=None) -> dict[str, np.ndarray]:
        """Every metric for each row of case weights W [r, C] (multiplicities): dict key -> float64 [r]."""
        pixels, images, at, case_dice = prepared or self._prepare()
        W = np.asarray(W, dtype=np.float64)
        out = dict(zip(("pixel_AUPRC", "pixel_AUROC", "pixel_ideal_Dice_oracle"), pixels.curves(W)))
        n = W.sum(1)
        for k in self.thresholds:
            tp, fp, fn = (W @ at[k]).T
            with np.errstate(invalid="ignore"):
                out[f"pixel_Dice@{k}"] = np.where(tp + fn > 0, _dice(tp, fp, fn, empty=np.nan), np.nan)
            d = case_dice[k]
            mean = W @ d / n
            var = (W * (d[None, :] - mean[:, None]) ** 2).sum(1) / np.where(n > 1, n - 1, 1)
            out[f"volume_Dice_mean@{k}"] = mean
            out[f"volume_Dice_sd@{k}"] = np.where(n > 1, np.sqrt(var), np.nan)
        ap, auc, _ = images.curves(W)
        out["image_AUROC"], out["image_AP"] = auc, np.where(np.isnan(auc), np.nan, ap)  # both need 2 classes
        return out

    def counts(self) -> dict[str, int]:
        """cases, pixels, lesion_pixels, cases_without_lesion, images, positive_images."""
        recs = self.records
        return {"cases": len(recs), "pixels": sum(r.pixels for r in recs),
                "lesion_pixels": sum(r.lesion_pixels for r in recs),
                "cases_without_lesion": sum(r.lesion_pixels == 0 for r in recs),
                "images": sum(len(r.image_scores) for r in recs),
                "positive_images": int(sum(r.image_labels.sum() for r in recs))}

    def compute(self) -> dict[str, float]:
        """Point estimates over all cases (every case weight 1): metric key -> float (NaN if undefined)."""
        return {k: float(v[0]) for k, v in self._evaluate(np.ones((1, len(self._cases)))).items()}

    def bootstrap(self, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, dict]:
        """Percentile bootstrap interval over cases for every metric: key -> {"ci_low", "ci_high",
        "n_resamples" (used), "n_skipped" (undefined in that many resamples)}; the bounds are NaN when
        every resample was skipped. Deterministic for a given seed."""
        if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
            raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
        if not 0.0 < float(confidence) < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        C = len(self._cases)
        if C == 0:
            raise ValueError("no cases to evaluate")
        idx = np.random.default_rng(seed).integers(0, C, size=(n_resamples, C))
        W = np.zeros((n_resamples, C))
        np.add.at(W, (np.repeat(np.arange(n_resamples), C), idx.ravel()), 1.0)
        values = self._evaluate(W)
        alpha = (1.0 - float(confidence)) / 2.0
        out = {}
        for k, v in values.items():
            ok = v[~np.isnan(v)]
            lo, hi = np.percentile(ok, [100 * alpha, 100 * (1 - alpha)]) if len(ok) else (math.nan, math.nan)
            out[k] = {"ci_low": float(lo), "ci_high": float(hi), "n_resamples": int(len(ok)),
                      "n_skipped": int(len(v) - len(ok))}
        return out

    def summary(self, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
        """Everything a report needs: {"metrics": key -> {"value", "ci_low", "ci_high", "n_skipped",
        "label"}, "counts": ``counts()``, "bootstrap": its settings, "bits": histogram resolution}."""
        point, ci = self.compute(), self.bootstrap(n_resamples, seed, confidence)
        metrics = {k: {"value": point[k], "ci_low": ci[k]["ci_low"], "ci_high": ci[k]["ci_high"],
                       "n_skipped": ci[k]["n_skipped"], "label": metric_label(k)} for k in point}
        return {"metrics": metrics, "counts": self.counts(),
                "bootstrap": {"unit": "case", "interval": "percentile", "n_resamples": n_resamples, "seed": seed,
                              "confidence": float(confidence)},
                "bits": self.bits}

    def case_table(self) -> list[dict]:
        """One row per case: case, pixels, lesion_pixels, pixel_AUPRC (NaN without lesion) and, per
        threshold NAME, Dice@NAME (the case's Dice, 1.0/0.0 for a case without lesion as above)."""
        C = len(self._cases)
        prepared = self._prepare()
        ap = prepared[0].curves(np.eye(C))[0] if C else []
        rows = []
        for i, r in enumerate(self.records):
            row = {"case": r.case_id, "pixels": r.pixels, "lesion_pixels": r.lesion_pixels,
                   "pixel_AUPRC": float(ap[i])}
            row.update({f"Dice@{k}": float(prepared[3][k][i]) for k in self.thresholds})
            rows.append(row)
        return rows
