"""Calibrated thresholds, the Calibration record, lesion masks and sizes, against independent computations
(a direct quantile / brute force for the thresholds, a flood fill for the components, closed forms for
volumes)."""

import itertools
import json
import math
from collections import deque

import numpy as np
import pytest
import yaml

from medcfx.metrics import PixelMetrics, _keys, bin_lower_edge, dice
from medcfx.operating_points import (
    Calibration,
    best_dice_threshold,
    calibrate,
    fpr_threshold,
    lesion_mask,
    lesion_size,
    lesion_volume_ml,
)


def brute_fpr_threshold(healthy, fpr):
    """Smallest healthy score t with #{healthy > t} <= floor(fpr * N), by trying every candidate."""
    allowed = math.floor(fpr * healthy.size)
    return min(t for t in np.unique(healthy) if np.count_nonzero(healthy > t) <= allowed)


def _stream(pm, scores, lesion, valid=None, chunks=3):
    for i in range(chunks):
        sl = slice(i, None, chunks)
        pm.update(scores[sl], lesion[sl], None if valid is None else valid[sl])


# -- threshold at a false-positive rate ---------------------------------------------------------------------


@pytest.mark.parametrize("fpr", [0.05, 0.01, 0.2, 0.5])
@pytest.mark.parametrize("n", [997, 4001])
def test_fpr_threshold_on_quantised_scores_is_the_direct_quantile(fpr, n):
    rng = np.random.default_rng(n)
    # multiples of 1/16 (exact bin edges), many ties, negative scores and signed zeros
    scores = (rng.integers(-40, 120, n) / 16).astype(np.float32)
    scores[rng.random(n) < 0.05] = -0.0
    lesion = rng.random(n) < 0.1  # lesion pixels must not count
    valid = rng.random(n) < 0.9  # nor pixels outside the valid mask
    pm = PixelMetrics()
    _stream(pm, scores, lesion, valid)
    t, achieved = fpr_threshold(pm, fpr)
    healthy = scores[valid & ~lesion]
    exact = np.quantile(healthy, 1 - fpr, method="inverted_cdf")
    assert exact == brute_fpr_threshold(healthy, fpr)
    # the same decisions on every healthy (and lesion) pixel, and the rate it achieves
    assert np.array_equal(scores > np.float32(t), scores > exact)
    assert achieved == np.count_nonzero(healthy > exact) / healthy.size <= fpr


@pytest.mark.parametrize("seed", [0, 1])
def test_fpr_threshold_on_continuous_scores_is_within_one_bin(seed):
    rng = np.random.default_rng(seed)
    healthy = rng.gamma(1.5, 0.05, 20000).astype(np.float32)
    for bits in (14, 22):
        pm = PixelMetrics(bits)
        _stream(pm, healthy, np.zeros(healthy.shape, bool))
        t, achieved = fpr_threshold(pm, 0.05)
        exact = np.quantile(healthy, 0.95, method="inverted_cdf")
        # t is the top of the bin holding the exact quantile: >= it, same bin, relative gap < 2^-(bits - 9)
        assert t >= exact and _keys(np.float32([t]), bits)[0] == _keys(np.float32([exact]), bits)[0]
        assert (t - exact) / exact < 2.0 ** -(bits - 9)
        n_above = np.count_nonzero(healthy > np.float32(t))
        assert achieved == n_above / healthy.size and n_above <= math.floor(0.05 * healthy.size)
        # and it is the smallest bin-top threshold: flagging that bin too exceeds the rate
        lower = np.nextafter(np.float32(bin_lower_edge(int(_keys(np.float32([t]), bits)[0]), bits)), np.float32(-1))
        assert np.count_nonzero(healthy > lower) > math.floor(0.05 * healthy.size)


def test_fpr_threshold_with_ties_at_the_top_and_healthy_only_data():
    # 30 % of healthy pixels share the top score: no threshold below it keeps the FPR <= 5 %
    healthy = np.concatenate([np.full(300, 2.0), np.linspace(0, 1, 700)]).astype(np.float32)
    pm = PixelMetrics()
    pm.update(healthy, np.zeros(healthy.shape, bool))
    t, achieved = fpr_threshold(pm, 0.05)
    assert np.float32(t) >= 2.0 and achieved == 0.0 and brute_fpr_threshold(healthy, 0.05) == 2.0
    assert not (healthy > np.float32(t)).any()
    # ties at the quantile itself: 100 pixels at 0.5 around the 95 % point
    healthy = np.concatenate([np.zeros(900), np.full(100, 0.5), np.ones(40)]).astype(np.float32)
    pm = PixelMetrics()
    pm.update(healthy, np.zeros(healthy.shape, bool))
    t, achieved = fpr_threshold(pm, 0.05)
    assert np.array_equal(healthy > np.float32(t), healthy > brute_fpr_threshold(healthy, 0.05))
    assert achieved == 40 / 1040


def test_fpr_threshold_refuses_bad_input():
    pm = PixelMetrics(12)
    pm.update(np.ones(5), np.ones(5, bool))  # lesion pixels only
    with pytest.raises(ValueError, match="healthy"):
        fpr_threshold(pm)
    pm.update(np.ones(5), np.zeros(5, bool))
    for bad in (0, 1, 1.5, -0.1, float("nan"), True, "0.05"):
        with pytest.raises(ValueError, match="fpr"):
            fpr_threshold(pm, bad)


# -- best-Dice threshold ------------------------------------------------------------------------------------


def test_best_dice_threshold_is_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    scores = (rng.integers(0, 64, 6000) / 32).astype(np.float32)
    lesion = rng.random(6000) < 0.05 + 0.2 * (scores > 1.2)
    pm = PixelMetrics()
    _stream(pm, scores, lesion)
    t, d = best_dice_threshold(pm)
    candidates = {float(u): dice(scores > u, lesion) for u in np.unique(scores)}
    candidates[-1.0] = dice(np.ones_like(lesion), lesion)  # flag everything
    assert d == pytest.approx(max(candidates.values()), abs=1e-12)
    assert dice(scores > np.float32(t), lesion) == pytest.approx(d, abs=1e-12)
    healthy_only = PixelMetrics(12)
    healthy_only.update(scores, np.zeros_like(lesion))
    assert best_dice_threshold(healthy_only) is None


# -- Calibration record ------------------------------------------------------------------------------------


def _calibration(annotated=True):
    rng = np.random.default_rng(11)
    scores = rng.gamma(2.0, 0.1, (4, 32, 32)).astype(np.float32)
    lesion = np.zeros(scores.shape, bool)
    if annotated:
        lesion[:, 10:16, 10:16] = True
        scores[lesion] += 0.3
    valid = np.ones(scores.shape, bool)
    valid[:, :2] = False
    pm = PixelMetrics()
    for s, m, v in zip(scores, lesion, valid):
        pm.update(s, m, v)
    return calibrate(pm, method="sanchez", data_fingerprint="sha256:abc", n_cases=4), scores, lesion, valid


def test_calibrate_records_the_thresholds_and_the_data():
    cal, scores, lesion, valid = _calibration()
    healthy = scores[valid & ~lesion]
    assert cal.n_pixels == valid.sum() and cal.n_healthy_pixels == healthy.size and cal.n_cases == 4
    assert cal.achieved_fpr == np.count_nonzero(healthy > np.float32(cal.threshold_fpr)) / healthy.size <= 0.05
    assert _keys(np.float32([cal.threshold_fpr]), 22)[0] == \
        _keys(np.float32([np.quantile(healthy, 0.95, method="inverted_cdf")]), 22)[0]
    flagged = (scores > np.float32(cal.threshold_best_dice))[valid]
    assert dice(flagged, lesion[valid]) == pytest.approx(cal.best_dice, abs=1e-12)
    assert cal.thresholds() == {"fpr5": cal.threshold_fpr, "valDice": cal.threshold_best_dice}
    healthy_cal = _calibration(annotated=False)[0]
    assert healthy_cal.threshold_best_dice is None and healthy_cal.best_dice is None
    assert healthy_cal.thresholds() == {"fpr5": healthy_cal.threshold_fpr}


@pytest.mark.parametrize("annotated", [True, False])
def test_calibration_round_trips_through_yaml_and_json(annotated):
    cal = _calibration(annotated)[0]
    d = cal.to_dict()
    assert all(isinstance(v, (str, int, float, type(None))) for v in d.values())
    assert Calibration.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cal
    assert Calibration.from_dict(json.loads(json.dumps(d))) == cal


@pytest.mark.parametrize("change, field", [
    ({"fpr": 1.0}, "fpr"), ({"fpr": "5%"}, "fpr"), ({"threshold_fpr": float("nan")}, "threshold_fpr"),
    ({"achieved_fpr": 0.5}, "achieved_fpr"), ({"n_cases": 0}, "n_cases"), ({"n_pixels": 2.5}, "n_pixels"),
    ({"n_healthy_pixels": True}, "n_healthy_pixels"), ({"n_healthy_pixels": 10**12}, "n_healthy_pixels"),
    ({"data_fingerprint": ""}, "data_fingerprint"), ({"method": None}, "method"),
    ({"best_dice": None}, "best_dice"), ({"best_dice": 1.5}, "best_dice"), ({"bits": 40}, "bits"),
    ({"rule": "score >= threshold"}, "rule"), ({"colour": "red"}, "colour"),
])
def test_calibration_from_dict_names_the_bad_field(change, field):
    d = {**_calibration()[0].to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        Calibration.from_dict(d)


def test_calibration_from_dict_names_missing_fields():
    d = _calibration()[0].to_dict()
    del d["data_fingerprint"], d["n_cases"]
    with pytest.raises(ValueError, match="data_fingerprint, n_cases"):
        Calibration.from_dict(d)
    with pytest.raises(ValueError, match="mapping"):
        Calibration.from_dict([1, 2])


# -- lesion masks ------------------------------------------------------------------------------------------


def flood_fill_components(mask, full):
    """Connected components by breadth-first search; full: 26 (3D) / 8 (2D) neighbours, else faces only."""
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=mask.ndim)
               if any(o) and (full or sum(map(abs, o)) == 1)]
    seen = np.zeros(mask.shape, bool)
    comps = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, comp = deque([start]), []
        while queue:
            p = queue.popleft()
            comp.append(p)
            for o in offsets:
                q = tuple(a + b for a, b in zip(p, o))
                if all(0 <= c < s for c, s in zip(q, mask.shape)) and mask[q] and not seen[q]:
                    seen[q] = True
                    queue.append(q)
        comps.append(comp)
    return comps


@pytest.mark.parametrize("shape, connectivity, full", [
    ((10, 11, 12), None, True), ((10, 11, 12), 26, True), ((10, 11, 12), 6, False),
    ((30, 31), None, True), ((30, 31), 4, False),
])
@pytest.mark.parametrize("min_size", [1, 3, 6])
def test_lesion_mask_components_match_a_flood_fill(shape, connectivity, full, min_size):
    rng = np.random.default_rng(min_size)
    heat = rng.random(shape).astype(np.float32)
    threshold = 0.8
    heat.flat[rng.integers(0, heat.size, 20)] = threshold  # equal to the threshold: not flagged
    valid = np.ones(shape, bool)
    valid[0] = False
    got = lesion_mask(heat, threshold, min_size, connectivity, valid=valid)
    comps = [c for c in flood_fill_components((heat > threshold) & valid, full) if len(c) >= min_size]
    expected = np.zeros(shape, bool)
    for c in comps:
        expected[tuple(np.array(c).T)] = True
    assert got.mask.dtype == bool and np.array_equal(got.mask, expected)
    assert got.n_components == len(comps)
    assert got.sizes.tolist() == sorted((len(c) for c in comps), reverse=True)


def test_lesion_mask_refuses_bad_input():
    h = np.zeros((4, 4, 4), np.float32)
    for kwargs, match in [({"threshold": float("nan")}, "threshold"), ({"min_size_voxels": 0}, "min_size"),
                          ({"connectivity": 8}, "connectivity"), ({"valid": np.ones((4, 4), bool)}, "valid")]:
        with pytest.raises(ValueError, match=match):
            lesion_mask(h, **{"threshold": 0.5, **kwargs})
    with pytest.raises(ValueError, match="2D or 3D"):
        lesion_mask(np.zeros(5), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        lesion_mask(np.full((3, 3), np.nan), 0.5)


def test_lesion_volume_of_a_box_and_an_ellipsoid_with_anisotropic_spacing():
    zooms = (0.5, 1.2, 3.0)
    box = np.zeros((40, 30, 20), bool)
    box[5:25, 3:13, 2:9] = True
    assert lesion_volume_ml(box, zooms) == pytest.approx(20 * 10 * 7 * 0.5 * 1.2 * 3.0 / 1000, rel=1e-12)
    # a sphere of radius 15 mm sampled on that grid: 4/3 pi r^3 mm^3 (voxelisation error well under 1 %)
    r = 15.0
    grid = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * z for n, z in zip((80, 40, 16), zooms)], indexing="ij")
    sphere = sum(g**2 for g in grid) <= r * r
    assert lesion_volume_ml(sphere, zooms) == pytest.approx(4 / 3 * math.pi * r**3 / 1000, rel=0.01)
    assert lesion_size(sphere, zooms) == (lesion_volume_ml(sphere, zooms), "ml")
    assert lesion_size(sphere) == (float(sphere.sum()), "voxels")
    square = np.zeros((20, 20), bool)
    square[2:7, 3:11] = True
    assert lesion_size(square, (0.7, 1.5)) == (pytest.approx(5 * 8 * 0.7 * 1.5), "mm^2")
    assert lesion_size(square) == (40.0, "pixels")
    for bad in [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("inf"), 1.0)]:
        with pytest.raises(ValueError, match="spacing"):
            lesion_volume_ml(box, bad)
    with pytest.raises(ValueError, match="3D"):
        lesion_volume_ml(square, (1.0, 1.0, 1.0))
