"""Streaming pixel metrics against scikit-learn and a brute-force best Dice."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medcfx.metrics import PixelMetrics, dice, image_metrics


def brute_force_best_dice(scores, mask):
    best = 0.0
    for t in np.unique(scores):
        best = max(best, dice(scores >= t, mask))
    return best


def _heatmaps(seed, n=6, size=24):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        cy, cx, r = rng.integers(6, size - 6, 2).tolist() + [rng.integers(2, 6)]
        yy, xx = np.mgrid[:size, :size]
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    scores = rng.gamma(2.0, 0.05, masks.shape) + masks * rng.gamma(3.0, 0.1, masks.shape)
    return scores.astype(np.float32), masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_ap_and_dice_match_sklearn_and_brute_force(seed):
    scores, masks = _heatmaps(seed)
    pm = PixelMetrics()
    for s, m in zip(scores, masks):  # one image at a time, as during evaluation
        pm.update(s, m)
    got = pm.compute()
    ap = average_precision_score(masks.ravel(), scores.ravel())
    assert abs(got["pixel_AUPRC"] - ap) < 1e-3
    assert abs(got["pixel_ideal_Dice"] - brute_force_best_dice(scores.ravel(), masks.ravel())) < 1e-3
    assert got["pixels"] == masks.size and got["lesion_pixels"] == masks.sum()
    # the reported threshold reproduces the ideal Dice
    t = got["pixel_best_threshold"]
    assert abs(dice(scores >= t, masks) - got["pixel_ideal_Dice"]) < 1e-3


def test_exact_on_quantised_scores_with_ties_and_negative_values():
    rng = np.random.default_rng(5)
    scores = rng.integers(-20, 20, 5000).astype(np.float32) / 8  # many ties, negative scores
    mask = rng.random(5000) < 0.1 + 0.02 * (scores + 2.5)
    pm = PixelMetrics()
    pm.update(scores, mask)
    got = pm.compute()
    assert got["pixel_AUPRC"] == pytest.approx(average_precision_score(mask, scores), abs=1e-12)
    assert got["pixel_ideal_Dice"] == pytest.approx(brute_force_best_dice(scores, mask), abs=1e-12)


def test_merge_and_valid_mask():
    scores, masks = _heatmaps(3)
    valid = np.ones_like(masks)
    valid[:, :4] = False
    a, b, whole = PixelMetrics(), PixelMetrics(), PixelMetrics()
    a.update(scores[:3], masks[:3], valid[:3])
    b.update(scores[3:], masks[3:], valid[3:])
    a.merge(b)
    whole.update(scores[valid], masks[valid])
    assert a.compute() == whole.compute()


def test_no_lesion_gives_nan_and_bad_input_is_refused():
    pm = PixelMetrics(bits=12)
    pm.update(np.ones((4, 4)), np.zeros((4, 4)))
    assert np.isnan(pm.compute()["pixel_AUPRC"])
    with pytest.raises(ValueError):
        pm.update(np.full((2, 2), np.nan), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        pm.update(np.zeros((2, 2)), np.zeros((3, 2)))


def test_memory_is_independent_of_test_set_size():
    pm = PixelMetrics()
    before = pm.pos.nbytes + pm.neg.nbytes
    rng = np.random.default_rng(0)
    for _ in range(5):
        pm.update(rng.random((8, 128, 128), dtype=np.float32), rng.random((8, 128, 128)) < 0.05)
    assert pm.pos.nbytes + pm.neg.nbytes == before <= 64 * 2**20


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.random(50) < 0.4
    scores = rng.random(50) + labels * 0.3
    got = image_metrics(scores, labels)
    assert got["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores))
    assert got["image_AP"] == pytest.approx(average_precision_score(labels, scores))
    assert np.isnan(image_metrics([0.1, 0.2], [1, 1])["image_AUROC"])


def test_signed_zeros_are_one_tie_as_in_sklearn():
    # scores mixing -0.0 and +0.0 (e.g. a difference map clipped at 0): scikit-learn ranks them as ties
    rng = np.random.default_rng(7)
    scores = rng.choice(np.array([-0.0, 0.0, 0.25, -0.5, 1.0], np.float32), 4000)
    mask = rng.random(4000) < np.where(np.signbit(scores), 0.2, 0.5)  # signed zeros labelled differently
    assert (np.signbit(scores) & (scores == 0)).any() and (~np.signbit(scores) & (scores == 0)).any()
    pm = PixelMetrics()
    pm.update(scores, mask)
    got = pm.compute()
    assert got["pixel_AUPRC"] == pytest.approx(average_precision_score(mask, scores), abs=1e-12)
    assert got["pixel_ideal_Dice"] == pytest.approx(brute_force_best_dice(scores, mask), abs=1e-12)
    assert dice(scores >= got["pixel_best_threshold"], mask) == pytest.approx(got["pixel_ideal_Dice"], abs=1e-12)


@pytest.mark.parametrize("bits", [12, 22])
def test_bin_edges_and_strict_thresholds_select_exactly_the_bins(bits):
    from medcfx.metrics import _keys, bin_lower_edge, threshold_flagging_from

    rng = np.random.default_rng(bits)
    scores = np.concatenate([rng.normal(0, 1, 3000), rng.normal(0, 1e-30, 200), [0.0, -0.0, 1e-45, -1e-45],
                             rng.normal(0, 1e30, 200)]).astype(np.float32)
    keys = _keys(scores, bits)
    for b in np.unique(keys)[:: max(1, len(np.unique(keys)) // 50)].tolist() + [int(_keys(np.float32([0.0]), bits)[0])]:
        assert np.array_equal(scores >= np.float32(bin_lower_edge(b, bits)), keys >= b)
        assert np.array_equal(scores > np.float32(threshold_flagging_from(b, bits)), keys >= b)
