"""Per-case test-set metrics and their bootstrap over cases, against scikit-learn on the pooled pixels and a
brute-force bootstrap that resamples the raw pixel arrays case-wise with the same draws."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medcfx.case_metrics import CaseMetrics, metric_label
from medcfx.metrics import dice

THRESHOLDS = {"fpr5": 1.25, "valDice": 0.5}


def _cases(seed, n_cases=7, n=300, levels=16, lesion_cases=None):
    """Cases of quantised scores (multiples of 1/levels: exact histogram bins) with 2 "slices" each."""
    rng = np.random.default_rng(seed)
    lesion_cases = range(n_cases) if lesion_cases is None else lesion_cases
    out = []
    for c in range(n_cases):
        lesion = (rng.random(n) < rng.uniform(0.02, 0.3)) if c in lesion_cases else np.zeros(n, bool)
        scores = (rng.integers(0, 2 * levels, n) + lesion * rng.integers(0, 2 * levels, n)) / levels
        scores = scores.astype(np.float32) * (-1 if c == 0 else 1)  # one case of negative scores
        valid = rng.random(n) < 0.9
        out.append((f"case{c}", scores, lesion, valid))
    return out


def _image_parts(scores, lesion, valid):
    """Two images per case (its halves): score = mean over valid pixels, label = has a lesion pixel."""
    h = len(scores) // 2
    parts = [(scores[:h], lesion[:h], valid[:h]), (scores[h:], lesion[h:], valid[h:])]
    return [float(s[v].mean()) for s, _, v in parts], [bool((m & v).any()) for _, m, v in parts]


def _fill(cases, bits=20, thresholds=THRESHOLDS):
    cm = CaseMetrics(thresholds, bits=bits)
    for start in (0, 100):  # every case in two batches, the cases interleaved
        for cid, s, m, v in cases:
            sl = slice(start, start + 100) if start == 0 else slice(100, None)
            cm.update(cid, s[sl], m[sl], v[sl])
    for cid, s, m, v in cases:
        cm.add_images(cid, *_image_parts(s, m, v))
    return cm


def brute_force(cases, thresholds=THRESHOLDS):
    """Every metric from the raw pixels of the given list of cases (duplicates allowed)."""
    s = np.concatenate([c[1][c[3]] for c in cases])
    m = np.concatenate([c[2][c[3]] for c in cases])
    out = {}
    has_pos, has_neg = m.any(), (~m).any()
    out["pixel_AUPRC"] = average_precision_score(m, s) if has_pos else math.nan
    out["pixel_AUROC"] = roc_auc_score(m, s) if has_pos and has_neg else math.nan
    out["pixel_ideal_Dice_oracle"] = max(dice(s >= t, m) for t in np.unique(s)) if has_pos else math.nan
    for name, t in thresholds.items():
        out[f"pixel_Dice@{name}"] = dice(s > t, m) if has_pos else math.nan
        per_case = []
        for _, cs, cm_, cv in cases:
            pred, ref = (cs > t)[cv], cm_[cv]
            per_case.append(1.0 if not pred.any() and not ref.any() else dice(pred, ref))
        out[f"volume_Dice_mean@{name}"] = float(np.mean(per_case))
        out[f"volume_Dice_sd@{name}"] = float(np.std(per_case, ddof=1)) if len(per_case) > 1 else math.nan
    img = [_image_parts(*c[1:]) for c in cases]
    scores = np.concatenate([i[0] for i in img])
    labels = np.concatenate([i[1] for i in img])
    one_class = labels.all() or not labels.any()
    out["image_AUROC"] = math.nan if one_class else roc_auc_score(labels, scores)
    out["image_AP"] = math.nan if one_class else average_precision_score(labels, scores)
    return out


def _close(a, b, tol=1e-12):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_estimates_match_sklearn_and_brute_force(seed):
    cases = _cases(seed, lesion_cases=[0, 2, 3, 5])
    got = _fill(cases).compute()
    expected = brute_force(cases)
    assert set(got) == set(expected)
    for k in expected:
        assert _close(got[k], expected[k]), (k, got[k], expected[k])


def test_point_estimates_on_continuous_scores_within_the_stated_resolution():
    rng = np.random.default_rng(4)
    cases = []
    for c in range(5):
        lesion = rng.random(20000) < 0.05
        scores = (rng.gamma(1.5, 0.03, 20000) + lesion * rng.gamma(2.0, 0.1, 20000)).astype(np.float32)
        cases.append((f"c{c}", scores, lesion, np.ones(20000, bool)))
    cm = CaseMetrics({"t": 0.1})
    for cid, s, m, v in cases:
        cm.update(cid, s, m, v)
    got = cm.compute()
    s = np.concatenate([c[1] for c in cases])
    m = np.concatenate([c[2] for c in cases])
    assert abs(got["pixel_AUPRC"] - average_precision_score(m, s)) < 1e-3
    assert abs(got["pixel_AUROC"] - roc_auc_score(m, s)) < 1e-4
    assert got["pixel_Dice@t"] == pytest.approx(dice(s > np.float32(0.1), m), abs=1e-12)  # exact: raw scores


def test_case_table_per_case_ap_and_dice():
    cases = _cases(5, lesion_cases=[1, 2, 4])
    rows = _fill(cases).case_table()
    assert [r["case"] for r in rows] == [c[0] for c in cases]
    for row, case in zip(rows, cases):
        expected = brute_force([case])
        assert row["pixels"] == case[3].sum() and row["lesion_pixels"] == (case[2] & case[3]).sum()
        assert _close(row["pixel_AUPRC"], expected["pixel_AUPRC"])
        for name in THRESHOLDS:
            assert _close(row[f"Dice@{name}"], expected[f"volume_Dice_mean@{name}"])


@pytest.mark.parametrize("seed, lesion_cases", [(0, None), (1, [3]), (2, [0, 2])])
def test_bootstrap_equals_a_brute_force_case_resampling_with_the_same_draws(seed, lesion_cases):
    # with one lesion case of five, about a third of the resamples have no lesion (skipped for pixel
    # metrics) and some have one image class only (skipped for image metrics)
    cases = _cases(seed, n_cases=5, lesion_cases=lesion_cases)
    cm = _fill(cases)
    R, C = 150, len(cases)
    got = cm.bootstrap(n_resamples=R, seed=seed, confidence=0.9)
    idx = np.random.default_rng(seed).integers(0, C, size=(R, C))
    values = {k: [] for k in got}
    for r in range(R):
        for k, v in brute_force([cases[i] for i in idx[r]]).items():
            values[k].append(v)
    for k, v in values.items():
        v = np.asarray(v)
        ok = v[~np.isnan(v)]
        assert got[k]["n_skipped"] == R - len(ok) and got[k]["n_resamples"] == len(ok), k
        lo, hi = np.percentile(ok, [5, 95]) if len(ok) else (math.nan, math.nan)
        assert _close(got[k]["ci_low"], lo, 1e-10) and _close(got[k]["ci_high"], hi, 1e-10), k
    if lesion_cases is not None:
        assert got["pixel_AUPRC"]["n_skipped"] > 0 and got["image_AUROC"]["n_skipped"] > 0
        assert got["volume_Dice_mean@fpr5"]["n_skipped"] == 0


def test_bootstrap_is_reproducible_and_its_interval_covers_the_point_estimate():
    cases = _cases(9, n_cases=12, lesion_cases=range(0, 12, 2))
    cm = _fill(cases)
    a, b = cm.summary(n_resamples=300, seed=3), cm.summary(n_resamples=300, seed=3)
    assert a == b and not any(math.isnan(v) for m in a["metrics"].values() for v in m.values()
                              if isinstance(v, float))
    assert cm.summary(n_resamples=300, seed=4)["metrics"] != a["metrics"]
    for k, m in a["metrics"].items():
        assert m["ci_low"] <= m["value"] <= m["ci_high"], k
        assert m["label"] == metric_label(k)
    assert a["counts"] == {"cases": 12, "pixels": sum(int(c[3].sum()) for c in cases),
                           "lesion_pixels": sum(int((c[2] & c[3]).sum()) for c in cases),
                           "cases_without_lesion": 6, "images": 24,
                           "positive_images": sum(sum(_image_parts(*c[1:])[1]) for c in cases)}
    assert a["bootstrap"] == {"unit": "case", "interval": "percentile", "n_resamples": 300, "seed": 3,
                              "confidence": 0.95}
    # a wider confidence level gives a wider interval from the same draws
    wide = cm.bootstrap(n_resamples=300, seed=3, confidence=0.99)
    assert all(wide[k]["ci_low"] <= a["metrics"][k]["ci_low"] for k in wide)


def test_case_record_stays_small():
    rng = np.random.default_rng(0)
    cm = CaseMetrics(bits=16)
    values = rng.gamma(1.5, 0.03, 5000).astype(np.float32)
    for _ in range(20):  # the same 5000 values streamed 20 times: 100k pixels, the same occupied bins
        cm.update("a", values, values > 0.1)
    rec = cm.records[0]
    assert rec.pixels == 100_000 and rec.lesion_pixels == 20 * int((values > 0.1).sum())
    assert len(rec.bins) == len(np.unique(rec.bins)) <= 2**16
    assert rec.nbytes == 12 * len(rec.bins) < 12 * 5000


def test_labels_mark_the_oracle():
    assert "oracle" in metric_label("pixel_ideal_Dice_oracle")
    assert metric_label("pixel_Dice@fpr5") == "Dice at threshold fpr5"
    with pytest.raises(KeyError):
        metric_label("accuracy")


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="bits"):
        CaseMetrics(bits=30)
    with pytest.raises(ValueError, match="threshold"):
        CaseMetrics({"a": float("nan")})
    with pytest.raises(ValueError, match="threshold name"):
        CaseMetrics({"a@b": 0.5})
    cm = CaseMetrics()
    with pytest.raises(ValueError, match="no cases"):
        cm.compute()
    with pytest.raises(ValueError, match="shape"):
        cm.update("a", np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match="NaN"):
        cm.update("a", np.full(3, np.nan), np.zeros(3, bool))
    with pytest.raises(ValueError, match="case_id"):
        cm.update("", np.zeros(3), np.zeros(3, bool))
    with pytest.raises(ValueError, match="labels"):
        cm.add_images("a", [0.1, 0.2], [0, 2])
    cm.update("a", np.zeros(3), np.zeros(3, bool))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_resamples"):
            cm.bootstrap(n_resamples=bad)
    with pytest.raises(ValueError, match="confidence"):
        cm.bootstrap(confidence=95)
