"""medcfx.anomalies: the five synthetic anomaly tasks, the Poisson solver, the task folds.

Independent references: scipy (sparse direct solve of the Poisson system, the exact Euclidean distance
transform, map_coordinates), coordinate images (bilinear sampling of a linear function is exact, so a
deformed coordinate image says where each pixel was sampled from), and closed-form counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, sparse
from scipy.sparse.linalg import spsolve

from medcfx.anomalies import (
    NUM_FOLDS,
    TASKS,
    AnomalyConfig,
    bilinear,
    distance_inside,
    example_grid,
    fold_tasks,
    foreground,
    fractal_noise,
    poisson_blend,
    synthesize,
)
from medcfx.errors import UsageError

from conftest import cli_env, run_cli


def brain_like(seed: int = 0, size: int = 64, channels: int = 2) -> np.ndarray:
    """A textured ellipse on a background of exactly -1 (like a preprocessed MRI slice)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    inside = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.36) ** 2 < 1
    img = np.full((channels, size, size), -1.0, dtype=np.float32)
    for c in range(channels):
        tex = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0)
        tex = 0.6 * tex / np.abs(tex).max()
        img[c][inside] = (0.1 + 0.2 * c + tex + 0.2 * np.sin(9 * xx + c))[inside]
    return np.clip(img, -1, 1)


def laplacian(u: np.ndarray) -> np.ndarray:
    """4 u_p - sum of the 4 neighbours (interior pixels; the border is left 0)."""
    out = np.zeros_like(u, dtype=np.float64)
    out[..., 1:-1, 1:-1] = (4 * u[..., 1:-1, 1:-1] - u[..., :-2, 1:-1] - u[..., 2:, 1:-1]
                            - u[..., 1:-1, :-2] - u[..., 1:-1, 2:])
    return out


# ------------------------------------------------------------------------------------------- folds


def test_folds_are_the_ten_3_of_5_splits_each_task_held_out_in_four():
    seen = set()
    held_out = {t: 0 for t in TASKS}
    for k in range(NUM_FOLDS):
        train, val = fold_tasks(k)
        assert len(train) == 3 and len(val) == 2 and not set(train) & set(val)
        assert set(train) | set(val) == set(TASKS)
        seen.add(frozenset(train))
        for t in val:
            held_out[t] += 1
    assert NUM_FOLDS == 10 and len(seen) == 10  # every 3-of-5 choice once: C(5,3) = 10
    assert held_out == {t: 4 for t in TASKS}  # C(4,1): a task is validated with each of the 4 others
    # the authors' order: itertools.combinations(range(5), 3)
    assert fold_tasks(0) == (("intra_blend", "inter_blend", "sink"), ("source", "intensity"))
    assert fold_tasks(9) == (("sink", "source", "intensity"), ("intra_blend", "inter_blend"))
    for bad in (-1, 10, 1.5, True):
        with pytest.raises(UsageError):
            fold_tasks(bad)


# ------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("task", TASKS)
def test_mask_is_exactly_the_changed_pixels_and_outside_is_untouched(task):
    img = brain_like(1)
    src = brain_like(2)
    fg = foreground(img)
    nonempty = 0
    for seed in range(12):
        res = synthesize(img, task, seed, source=src)
        assert res.image.shape == img.shape and res.image.dtype == img.dtype
        changed = np.any(res.image != img, axis=0)
        assert np.array_equal(res.mask, changed)
        assert np.array_equal(res.image[:, ~res.region], img[:, ~res.region])  # bit-exact outside the shapes
        assert not (res.mask & ~res.region).any()
        assert not (res.region & ~fg).any()  # shapes stay inside the foreground
        assert 1 <= len(res.parts) <= 4
        assert res.image.min() >= img.min() and res.image.max() <= img.max()
        nonempty += bool(res.mask.any())
    assert nonempty >= 10


@pytest.mark.parametrize("task", TASKS)
def test_a_seed_reproduces_the_anomaly(task):
    img, src = brain_like(3), brain_like(4)
    a = synthesize(img, task, 123, source=src)
    b = synthesize(img, task, 123, source=src)
    c = synthesize(img, task, 124, source=src)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


def test_number_of_anomalies_follows_the_geometric_rule():
    img = brain_like(5, size=96)
    counts = np.bincount([len(synthesize(img, "sink", s).parts) for s in range(400)], minlength=5)
    expected = np.array([0, 0.5, 0.25, 0.125, 0.125]) * 400
    assert counts[0] == 0 and counts[5:].sum() == 0 if len(counts) > 5 else counts[0] == 0
    for k in range(1, 5):  # 4 binomial standard deviations
        sd = math.sqrt(400 * (expected[k] / 400) * (1 - expected[k] / 400))
        assert abs(counts[k] - expected[k]) < 4 * sd, (k, counts)


def test_empty_foreground_leaves_the_image_unchanged():
    img = np.full((1, 32, 32), -1.0, dtype=np.float32)
    res = synthesize(img, "intensity", 0)
    assert not res.mask.any() and res.parts == [] and np.array_equal(res.image, img)


def test_bad_calls_are_one_line_usage_errors():
    img = brain_like(0)
    with pytest.raises(UsageError, match="unknown anomaly task"):
        synthesize(img, "cutpaste", 0)
    with pytest.raises(UsageError, match="needs a source"):
        synthesize(img, "intra_blend", 0)
    with pytest.raises(UsageError, match="source image must be"):
        synthesize(img, "inter_blend", 0, source=img[:1])
    with pytest.raises(UsageError, match="unknown anomalies option"):
        AnomalyConfig.from_dict({"blnd": "mixed"})
    with pytest.raises(UsageError, match="blend"):
        AnomalyConfig(blend="alpha")


# ------------------------------------------------------------------------------------------- deformations


def coordinate_image(size: int = 64) -> np.ndarray:
    """Channel 0 = y + 1, channel 1 = x + 1: bilinear sampling returns the sampled coordinates exactly."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    return np.stack([yy + 1, xx + 1])


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_deformation_samples_along_the_ray_inwards_or_outwards(kind):
    img = coordinate_image()
    cfg = AnomalyConfig(continue_prob=0.0)  # one anomaly: its centre is known
    for seed in range(6):
        res = synthesize(img, kind, seed, config=cfg)
        (part,) = res.parts
        cy, cx = part["centre"]
        ys, xs = np.nonzero(res.region)
        qy, qx = res.image[0, ys, xs] - 1, res.image[1, ys, xs] - 1  # where each pixel was sampled from
        py, px = ys - cy, xs - cx
        r = np.hypot(py, px)
        rq = np.hypot(qy - cy, qx - cx)
        cross = py * (qx - cx) - px * (qy - cy)
        assert np.all(np.abs(cross) <= 1e-6 * np.maximum(r, 1) ** 2)  # same ray through the centre
        assert np.all(py * (qy - cy) + px * (qx - cx) >= -1e-9)  # same side of the centre
        if kind == "source":  # content pushed outwards: each pixel shows what was nearer the centre
            assert np.all(rq <= r + 1e-9)
        else:
            assert np.all(rq >= r - 1e-9)
        shift = np.abs(rq - r)
        # the largest displacement on a ray is (push / mean edge radius) * its edge radius
        frac = part["push"] / part["edge_mean"]
        assert shift.max() <= frac * (r.max() + 1) + 1e-9
        assert shift.max() >= 0.5 * frac * np.median(r)
        assert part["push"] <= 5.0


# ------------------------------------------------------------------------------------------- intensity


def test_intensity_change_has_one_sign_per_channel_a_ramp_and_bounded_magnitude():
    img = np.full((2, 64, 64), -1.0)
    img[:, 4:60, 4:60] = 0.0  # flat foreground far from the clip limits... except the range check below
    img[:, 30, 30] = 1.0
    img[:, 31, 31] = -0.99
    cfg = AnomalyConfig(continue_prob=0.0)
    for seed in range(8):
        res = synthesize(img, "intensity", seed, config=cfg)
        (part,) = res.parts
        delta = res.image - img
        for c, sign in enumerate(part["signs"]):
            d = delta[c][res.region]
            assert np.all(d * sign >= -1e-12)
            assert np.abs(d).max() <= part["magnitude"] + 1e-9
        # at the shape's edge (distance 1 from outside) the change is at most magnitude / ramp length
        edge = res.region & ~ndimage.binary_erosion(res.region)
        assert np.abs(delta[:, edge]).max() <= part["magnitude"] / part["ramp"] + 1e-9


# ------------------------------------------------------------------------------------------- blending


def scipy_poisson(dst, src, region, mode):
    """Independent reference: assemble the sparse system and solve it directly."""
    ys, xs = np.nonzero(region)
    index = -np.ones(region.shape, dtype=np.int64)
    index[ys, xs] = np.arange(len(ys))
    out = dst.astype(np.float64).copy()
    for c in range(dst.shape[0]):
        rows, cols, vals, b = [], [], [], np.zeros(len(ys))
        for n, (y, x) in enumerate(zip(ys, xs)):
            rows.append(n), cols.append(n), vals.append(4.0)
            for qy, qx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                g = src[c, y, x] - src[c, qy, qx]
                if mode == "mixed":
                    f = dst[c, y, x] - dst[c, qy, qx]
                    g = g if abs(g) > abs(f) else f
                b[n] += g
                if index[qy, qx] >= 0:
                    rows.append(n), cols.append(index[qy, qx]), vals.append(-1.0)
                else:
                    b[n] += dst[c, qy, qx]
        A = sparse.csr_matrix((vals, (rows, cols)), shape=(len(ys), len(ys)))
        out[c, ys, xs] = spsolve(A, b)
    return out


def blob_region(size=40, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    theta = np.arctan2(yy - size / 2, xx - size / 2)
    return r < size * (0.25 + 0.06 * np.cos(3 * theta + rng.uniform(0, 6)))


@pytest.mark.parametrize("mode", ["source", "mixed"])
def test_poisson_blend_matches_a_sparse_direct_solve(mode):
    rng = np.random.default_rng(0)
    dst = ndimage.gaussian_filter(rng.normal(size=(2, 40, 40)), (0, 2, 2))
    src = ndimage.gaussian_filter(rng.normal(size=(2, 40, 40)), (0, 1, 1)) * 3
    region = blob_region()
    ours = poisson_blend(dst, src, region, mode)
    ref = scipy_poisson(dst, src, region, mode)
    np.testing.assert_allclose(ours, ref, atol=1e-8)
    assert np.array_equal(ours[:, ~region], dst[:, ~region])


def test_source_blend_reproduces_the_source_gradients_inside_the_region():
    rng = np.random.default_rng(1)
    dst = rng.normal(size=(1, 40, 40))
    src = ndimage.gaussian_filter(rng.normal(size=(1, 40, 40)), 1.5) * 5
    region = blob_region(seed=3)
    out = poisson_blend(dst, src, region, "source")
    # the discrete Laplacian (divergence of the gradient) of the result is the source's at every pixel of Omega
    np.testing.assert_allclose(laplacian(out)[:, region], laplacian(src)[:, region], atol=1e-7)
    # and the result differs from both images there (it is neither a copy nor an alpha blend of src)
    assert np.abs(out - src)[:, region].mean() > 0.1 and np.abs(out - dst)[:, region].mean() > 0.1


def test_blend_task_with_a_flat_source_is_harmonic_inside_the_shapes():
    """A constant source has zero gradients, so "source" blending leaves a harmonic fill of the boundary."""
    img = brain_like(6).astype(np.float64)
    flat = np.full_like(img, 0.3)
    cfg = AnomalyConfig(blend="source", continue_prob=0.0)
    for seed in range(5):
        res = synthesize(img, "inter_blend", seed, source=flat, config=cfg)
        assert res.mask.any()
        np.testing.assert_allclose(laplacian(res.image)[:, res.region], 0.0, atol=1e-7)


# ------------------------------------------------------------------------------------------- helpers


def test_distance_inside_is_the_exact_euclidean_distance_transform():
    for seed in range(4):
        m = blob_region(30, seed) | (np.random.default_rng(seed).random((30, 30)) > 0.9)
        m[0] = m[-1] = False
        m[:, 0] = m[:, -1] = False
        np.testing.assert_allclose(distance_inside(m), ndimage.distance_transform_edt(m), atol=1e-12)


def test_distance_inside_counts_pixels_beyond_the_array_as_outside():
    """Brute force over every False pixel of the mask framed by a ring of False pixels (the mask touches the border)."""
    rng = np.random.default_rng(5)
    m = rng.random((9, 7)) > 0.25
    m[0, :] = True
    framed = np.pad(m, 1)
    outside = np.argwhere(~framed)
    want = np.zeros(m.shape)
    for y, x in np.argwhere(m):
        want[y, x] = np.sqrt(((outside - (y + 1, x + 1)) ** 2).sum(1).min())
    np.testing.assert_allclose(distance_inside(m), want, atol=1e-12)
    assert np.array_equal(distance_inside(np.ones((3, 5), bool))[:, 2], [1.0, 2.0, 1.0])  # the frame is outside


def test_bilinear_matches_scipy_map_coordinates():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 17, 23))
    ys, xs = rng.uniform(-2, 18, 200), rng.uniform(-2, 24, 200)
    ref = np.stack([ndimage.map_coordinates(img[c], [np.clip(ys, 0, 16), np.clip(xs, 0, 22)], order=1)
                    for c in range(2)])
    np.testing.assert_allclose(bilinear(img, ys, xs), ref, atol=1e-12)


def test_fractal_noise_is_smooth_in_unit_range_and_seeded():
    a = fractal_noise((40, 30), np.random.default_rng(0))
    b = fractal_noise((40, 30), np.random.default_rng(0))
    assert np.array_equal(a, b) and a.min() == 0.0 and a.max() == 1.0
    white = np.random.default_rng(1).random((40, 30))
    # neighbouring values differ far less than for white noise of the same range
    assert np.abs(np.diff(a, axis=0)).mean() < 0.3 * np.abs(np.diff(white, axis=0)).mean()


def test_example_grid_writes_one_png_row_pair_per_image(tmp_path):
    imgs = [brain_like(s) for s in range(3)]
    path = example_grid(imgs, tmp_path / "grid.png", seed=0, scale=1)
    with Image.open(path) as im:
        w, h = im.size
    assert w > 6 * 64 and h > 6 * 64  # 6 columns, 3 x 2 rows of 64-px tiles plus titles


def test_synth_anomalies_cli_writes_the_grid(tmp_path, home):
    from medcfx.demo import make_demo

    data = make_demo("brain", tmp_path / "brains", cases=2, seed=0, shape=[40, 40, 26])
    out = tmp_path / "grid.png"
    env = cli_env(home)
    run_cli(["data", "synth-anomalies", data, "--modalities", "t2", "--size", "32", "--rows", "2", "--out", out],
            env=env, check=0)
    with Image.open(out) as im:
        assert im.size[0] > 6 * 32 * 3
    bad = run_cli(["data", "synth-anomalies", data, "--out", tmp_path / "grid.jpg"], env=env)
    assert bad.returncode == 2 and "png" in bad.stderr.lower() and not (tmp_path / "grid.jpg").exists()
    bad = run_cli(["data", "synth-anomalies", data, "--rows", "1", "--out", out], env=env)
    assert bad.returncode == 2 and "--rows" in bad.stderr
