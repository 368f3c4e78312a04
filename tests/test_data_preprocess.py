"""medcfx.data.preprocess: normalisation, resizing, slice selection and labels, masks, geometry, SliceSet."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from test_data_helpers import (
    MODS,
    area_resize_ref,
    brain_mask,
    pad_square_ref,
    write_brats,
    write_brats_case,
    write_png,
)

from medcfx.data.geometry import SliceGeometry, mask_from_fraction, resize_matrix
from medcfx.data.intensity import scale_image
from medcfx.data.preprocess import PreprocessConfig, prepare
from medcfx.errors import MedcfxError, UsageError

# ---------------------------------------------------------------------------------------------------------
# resizing


@pytest.mark.parametrize("n_in,n_out", [(240, 64), (240, 60), (24, 16), (7, 3), (24, 24)])
def test_area_resize_matches_supersampling_reference(n_in, n_out):
    img = np.random.default_rng(0).random((2, n_in, n_in))
    m = resize_matrix(n_in, n_out).astype(np.float64)
    ours = np.einsum("ia,zab,jb->zij", m, img, m)
    np.testing.assert_allclose(ours, area_resize_ref(img, n_out), atol=1e-6)


def test_integer_factor_area_is_block_mean():
    img = np.random.default_rng(1).random((240, 240))
    m = resize_matrix(240, 60).astype(np.float64)
    np.testing.assert_allclose(m @ img @ m.T, img.reshape(60, 4, 60, 4).mean(axis=(1, 3)), atol=1e-6)


def test_enlarging_is_linear_interpolation():
    x = np.random.default_rng(2).random(10)
    m = resize_matrix(10, 23)
    src = np.clip((np.arange(23) + 0.5) * 10 / 23 - 0.5, 0, 9)
    np.testing.assert_allclose(m @ x, np.interp(src, np.arange(10), x), atol=1e-6)
    assert np.all(m >= 0)
    np.testing.assert_allclose(m.sum(axis=1), 1, atol=1e-6)


@pytest.mark.parametrize("n_in,n_out", [(10, 23), (64, 155), (16, 64)])
def test_enlarging_matrix_equals_scipy_zoom(n_in, n_out):
    """The matrix is kept for speed (see resize_matrix); scipy's linear zoom on the pixel-area grid is the reference."""
    from scipy import ndimage

    img = np.random.default_rng(3).normal(size=(n_in, n_in))
    m = resize_matrix(n_in, n_out).astype(np.float64)
    ref = ndimage.zoom(img, n_out / n_in, order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(m @ img @ m.T, ref, atol=1e-6)


def test_max3x3_equals_scipy_maximum_filter():
    """The numpy 3x3 maximum is kept for speed (see _max3x3); scipy's maximum_filter is the reference."""
    from scipy import ndimage

    from medcfx.data.geometry import _max3x3

    rng = np.random.default_rng(4)
    x = np.where(rng.random((3, 9, 11)) < 0.3, rng.random((3, 9, 11)), 0).astype(np.float32)
    ref = ndimage.maximum_filter(x, size=(1, 3, 3), mode="constant", cval=-np.inf)
    np.testing.assert_array_equal(_max3x3(x), ref)
    np.testing.assert_array_equal(_max3x3(x[0]), ref[0])


# ---------------------------------------------------------------------------------------------------------
# small lesions


def _components(mask: np.ndarray):
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    return [np.argwhere(lab == i + 1) for i in range(n)]


def test_small_lesions_survive_240_to_64():
    rng = np.random.default_rng(0)
    sl = np.zeros((240, 240), bool)
    centres = []
    for _ in range(25):  # isolated lesions of 1..3 px side, well apart
        while True:
            y, x = rng.integers(5, 232, 2)
            if all(abs(y - a) > 20 or abs(x - b) > 20 for a, b in centres):
                break
        s = int(rng.integers(1, 4))
        sl[y : y + s, x : x + s] = True
        centres.append((y, x))
    g = SliceGeometry((240, 240), None, 64, (0,))
    m = g.mask_to_model(sl)[0]
    plain = area_resize_ref(sl.astype(float), 64) >= 0.5
    lost_by_plain_rule = 0
    for comp in _components(sl):
        cy, cx = comp.mean(axis=0) + 0.5  # continuous centre in input pixels
        my, mx = int(cy * 64 / 240), int(cx * 64 / 240)
        win = (slice(max(my - 1, 0), my + 2), slice(max(mx - 1, 0), mx + 2))
        assert m[win].any(), f"lesion at {cy, cx} vanished"
        lost_by_plain_rule += not plain[win].any()
    # the plain area rule (>= 0.5) alone would have lost most of them: the test can fail
    assert lost_by_plain_rule >= 15
    # no lesion appears where there is none: every mask pixel overlaps a lesion
    assert np.all(area_resize_ref(sl.astype(float), 64)[m > 0] > 0)


def test_large_lesion_keeps_its_area():
    yy, xx = np.mgrid[:240, :240]
    disc = (yy - 100.3) ** 2 + (xx - 130.7) ** 2 < 40**2
    g = SliceGeometry((240, 240), None, 64, (0,))
    m = g.mask_to_model(disc)[0]
    expected = disc.sum() * (64 / 240) ** 2
    assert abs(m.sum() - expected) / expected < 0.05
    np.testing.assert_array_equal(m, area_resize_ref(disc.astype(float), 64) >= 0.5)  # big: the area rule


def test_mask_rule_on_handmade_fraction_map():
    f = np.zeros((1, 6, 6), np.float32)
    f[0, 1, 1] = 0.2  # isolated small lesion: its peak is kept
    f[0, 1, 2] = 0.1
    f[0, 4, 3] = 0.7  # big lesion pixel
    f[0, 4, 4] = 0.3  # its rim next to a >= 0.5 pixel: dropped
    expected = np.zeros((1, 6, 6), np.uint8)
    expected[0, 1, 1] = expected[0, 4, 3] = 1
    np.testing.assert_array_equal(mask_from_fraction(f), expected)


# ---------------------------------------------------------------------------------------------------------
# geometry


def test_geometry_pad_and_resize_match_reference():
    rng = np.random.default_rng(3)
    vol = rng.random((2, 30, 18, 5)).astype(np.float32)  # [C, X, Y, Z], non-square plane
    g = SliceGeometry((30, 18, 5), 2, 10, (0, 2, 3))
    out = g.to_model(vol)
    assert out.shape == (3, 2, 10, 10)
    for k, z in enumerate(g.kept):
        ref = area_resize_ref(pad_square_ref(vol[:, :, :, z].astype(np.float64)), 10)
        np.testing.assert_allclose(out[k], ref, atol=1e-5)


def test_geometry_other_axis_and_c_order():
    vol = np.ascontiguousarray(np.random.default_rng(4).random((12, 16, 20)).astype(np.float32))
    g = SliceGeometry((12, 16, 20), 0, 8, (1, 5))
    out = g.to_model(vol)
    for k, x in enumerate((1, 5)):
        np.testing.assert_allclose(out[k], area_resize_ref(pad_square_ref(vol[x].astype(float)), 8), atol=1e-5)


def test_round_trip_constant_per_slice_is_exact_on_square_planes():
    Z = 6
    vol = np.broadcast_to(np.arange(1, Z + 1, dtype=np.float32), (48, 48, Z)).copy()
    g = SliceGeometry((48, 48, Z), 2, 16, (1, 2, 4))
    back = g.to_original(g.to_model(vol), fill=-7.0)
    np.testing.assert_allclose(back[..., [1, 2, 4]], vol[..., [1, 2, 4]], atol=1e-5)
    assert np.all(back[..., [0, 3, 5]] == -7.0)  # skipped slices filled


def test_round_trip_smooth_function_non_square():
    X, Y, Z = 60, 44, 4
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    vol = (np.sin(x / 9.0) + np.cos(y / 7.0) + 0.3 * z + 3).astype(np.float32)
    g = SliceGeometry((X, Y, Z), 2, 32, tuple(range(Z)))
    back = g.to_original(g.to_model(vol[None]))[0]
    assert back.shape == vol.shape
    # away from the zero-padded border (the plane is padded along y), the round trip is close
    inner = back[4:-4, 4:-4]
    ref = vol[4:-4, 4:-4]
    assert np.max(np.abs(inner - ref)) < 0.1 and np.mean(np.abs(inner - ref)) < 0.03


def test_round_trip_mask_and_boxes():
    m = np.zeros((40, 40, 3), bool)
    m[10:30, 5:25, 1] = True
    g = SliceGeometry((40, 40, 3), 2, 20, (0, 1, 2))
    back = g.to_original(g.mask_to_model(m))
    assert back.dtype == np.uint8 and back.shape == m.shape
    from scipy import ndimage

    # exact up to a one-pixel band at the outline (half a model pixel)
    band = np.stack([ndimage.binary_dilation(m[..., z]) & ~ndimage.binary_erosion(m[..., z]) for z in range(3)], -1)
    assert np.all((back.astype(bool) == m) | band)
    assert (back.astype(bool) != m).sum() < 0.15 * m.sum()
    g2 = SliceGeometry((30, 50), None, 25, (0,))  # H=30, W=50: padded 10 rows above
    box = (5.0, 3.0, 20.0, 12.0)
    mb = g2.box_to_model(box)
    assert mb == pytest.approx((2.5, 6.5, 10.0, 11.0))
    assert g2.box_to_original(mb) == pytest.approx(box)


# ---------------------------------------------------------------------------------------------------------
# BraTS end to end against an independent numpy reference


def _reference_case(arrays: dict, size: int, pct: float = 99.0, min_fg: float = 0.05):
    """Independent re-implementation: foreground percentile, x/p clipped, pad, area resize, 2u-1."""
    vols = np.stack([arrays[m] for m in MODS]).astype(np.float64)
    fg = (vols > 0).any(axis=0)
    area = fg.sum(axis=(0, 1))
    kept = [z for z in range(vols.shape[-1]) if area[z] >= min_fg * area.max()]
    out = []
    for z in kept:
        chans = []
        for c in range(4):
            p = np.percentile(vols[c][fg], pct)
            u = np.clip(vols[c, :, :, z] / p, 0, 1)
            chans.append(area_resize_ref(pad_square_ref(u), size) * 2 - 1)
        out.append(chans)
    seg = arrays["seg"]
    labels = [float(seg[:, :, z].any()) for z in kept]
    return np.array(out), np.array(labels), kept


def test_prepare_brats_matches_numpy_reference(tmp_path, home):
    root = tmp_path / "brats"
    arrays = {i: write_brats_case(root, f"BraTS_{i:03d}", seed=i, lesion=((3, 5), (4, 6), (2, 3 + i))) for i in range(2)}
    ss = prepare(root, PreprocessConfig(size=16))
    assert ss.channels == list(MODS) and ss.label_names == ["unhealthy"] and ss.kind == "brats"
    for i in range(2):
        ref_img, ref_lab, kept = _reference_case(arrays[i], 16)
        rows = ss.case_rows(f"BraTS_{i:03d}")
        assert list(ss.slice_index[rows]) == kept
        np.testing.assert_allclose(np.asarray(ss.images[rows]), ref_img, atol=2e-5)
        np.testing.assert_array_equal(ss.labels[rows, 0], ref_lab)
        # masks: non-empty exactly where the slice is unhealthy (small lesions kept)
        np.testing.assert_array_equal(np.asarray(ss.masks[rows]).any(axis=(1, 2)), ref_lab.astype(bool))
        assert ss.has_mask[rows].all()
    assert ss.images.dtype == np.float32 and isinstance(ss.images, np.memmap)
    assert float(np.min(ss.images)) == -1.0 and float(np.max(ss.images)) <= 1.0


def test_percentile_and_clip_options(tmp_path, home):
    root = tmp_path / "b"
    arrays = write_brats_case(root, "C", seed=5)
    ss = prepare(root, PreprocessConfig(size=24, percentile=90.0, clip=False, min_foreground=0.0))
    assert len(ss) == arrays["t1"].shape[2]  # min_foreground=0 keeps every slice
    vol = arrays["t2"].astype(np.float64)
    fg = np.stack([arrays[m] > 0 for m in MODS]).any(axis=0)
    p = np.percentile(vol[fg], 90.0)
    z = 6
    ref = area_resize_ref(pad_square_ref(vol[:, :, z] / p), 24) * 2 - 1
    np.testing.assert_allclose(np.asarray(ss.images[z, 2]), ref, atol=2e-5)
    assert float(np.max(ss.images)) > 1.0  # not clipped


def test_min_foreground_selection(tmp_path, home):
    root = tmp_path / "b"
    arrays = write_brats_case(root, "C", seed=1)
    fg = np.stack([arrays[m] > 0 for m in MODS]).any(axis=0)
    area = fg.sum(axis=(0, 1))
    for mf in (0.3, 0.8):
        ss = prepare(root, PreprocessConfig(size=8, min_foreground=mf))
        assert list(ss.slice_index) == [z for z in range(len(area)) if area[z] >= mf * area.max()]


def test_write_case_back_on_input_grid(tmp_path, home):
    root = write_brats(tmp_path / "b", n=1)
    ss = prepare(root, PreprocessConfig(size=16))
    cid = ss.cases[0]
    rows = ss.case_rows(cid)
    heat = np.asarray(ss.images[rows])[:, 3]  # the flair channel as a stand-in heatmap
    out = ss.write_case(cid, heat, tmp_path / "out" / "heat.nii.gz")
    src = nib.load(str(ss.reference(cid)))
    back = nib.load(str(out))
    assert back.shape == src.shape
    np.testing.assert_array_equal(back.affine, src.affine)
    np.testing.assert_allclose(back.get_fdata(), ss.geometry(cid).to_original(heat), atol=1e-6)
    np.testing.assert_array_equal(ss.affine(cid), src.affine)
    # a subset keeps only some slices; the others are filled
    sub = ss.subset(rows[::2])
    vol = sub.to_original(cid, np.asarray(sub.images[sub.case_rows(cid)])[:, 0], fill=-5)
    missing = sorted(set(range(src.shape[2])) - set(ss.slice_index[rows[::2]].tolist()))
    assert np.all(vol[:, :, missing] == -5)


def test_shape_mismatch_between_modalities(tmp_path, home):
    root = write_brats(tmp_path / "b", n=1)
    f = root / "BraTS_000" / "BraTS_000_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 20, 11), np.float32), np.eye(4)), str(f))
    with pytest.raises(MedcfxError, match=r"case BraTS_000: t2 \(BraTS_000_t2.nii.gz\) is not on the grid of t1 .*shape \(24, 20, 12\) vs \(24, 20, 11\)"):
        prepare(root, PreprocessConfig(size=8))


def test_problems_in_layout_refuse_prepare(tmp_path, home):
    root = write_brats(tmp_path / "b", n=2)
    (root / "BraTS_001" / "BraTS_001_t1.nii.gz").unlink()
    with pytest.raises(MedcfxError, match=r"missing modality t1.*medcfx data check"):
        prepare(root)


def test_config_validation_and_from_dict():
    with pytest.raises(UsageError, match="unknown preprocess key"):
        PreprocessConfig.from_dict({"sise": 64})
    with pytest.raises(UsageError, match="percentile"):
        PreprocessConfig(percentile=0)
    with pytest.raises(UsageError, match="size"):
        PreprocessConfig(size=2)
    c = PreprocessConfig.from_dict({"modalities": "t2f,t1n", "size": 128})
    assert c.modalities == ("flair", "t1") and c.size == 128


# ---------------------------------------------------------------------------------------------------------
# 2D


def test_scale_image_rules():
    """Each rule against its formula computed here with numpy (percentile: numpy's linear interpolation)."""
    x = np.arange(256, dtype=np.float32).reshape(1, 16, 16)
    eight = {"integer": True, "bit_depth": 8}
    p8 = np.percentile(x, 99)
    np.testing.assert_allclose(scale_image(x, eight), np.clip(x / p8, 0, 1), rtol=1e-6)  # percentile (default)
    np.testing.assert_allclose(scale_image(x, eight, "legacy"), x / 255)
    np.testing.assert_allclose(scale_image(x, eight, "nominal"), x / 255)
    y = np.random.default_rng(0).integers(0, 4000, (1, 20, 20)).astype(np.float32)
    sixteen = {"integer": True, "bit_depth": 16}
    p = np.percentile(y, 99)
    for rule in ("percentile", "legacy"):
        np.testing.assert_allclose(scale_image(y, sixteen, rule), np.clip(y / p, 0, 1), rtol=1e-6)
    meta = dict(sixteen)
    np.testing.assert_allclose(scale_image(y, meta, "nominal"), y / 65535, rtol=1e-6)
    assert any("less than 1/16 of its nominal range 0..65535" in n for n in meta["notes"])  # 4000 < 65535 / 16: said
    ct = np.random.default_rng(1).uniform(-1000, 2000, (1, 10, 10)).astype(np.float32)
    lo, hi = ct.min(), np.percentile(ct, 99)
    np.testing.assert_allclose(scale_image(ct, {"integer": False}), np.clip((ct - lo) / (hi - lo), 0, 1), rtol=1e-5, atol=1e-6)
    # CT in HU: the fixed window, whatever the image's own range; VOI: over the window's output range
    np.testing.assert_allclose(scale_image(ct, {"hu": True}), np.clip((ct + 1024) / 4095, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(scale_image(ct, {"voi_range": (-500, 1500)}), np.clip((ct + 500) / 2000, 0, 1), rtol=1e-5, atol=1e-6)
    # padding pixels: out of the percentile and 0 in the result
    pad = np.zeros((10, 10), bool)
    pad[:2] = True
    ctp = ct.copy()
    ctp[0, pad] = -3000
    lo, hi = ctp[0, ~pad].min(), np.percentile(ctp[0, ~pad], 99)
    want = np.where(pad, 0, np.clip((ctp - lo) / (hi - lo), 0, 1))
    np.testing.assert_allclose(scale_image(ctp, {"padding": pad}), want, rtol=1e-5, atol=1e-6)


def test_prepare_folder_8bit_and_16bit_with_masks(tmp_path, home):
    rng = np.random.default_rng(0)
    n8 = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    write_png(tmp_path / "normal" / "n.png", n8)
    a16 = rng.integers(0, 60000, (30, 20)).astype(np.uint16)
    write_png(tmp_path / "abnormal" / "a.png", a16)
    m = np.zeros((30, 20), np.uint8)
    m[10:12, 4:6] = 255
    write_png(tmp_path / "masks" / "a.png", m)
    ss = prepare(tmp_path, PreprocessConfig(size=10, intensity="legacy"))
    assert ss.channels == ["grey"] and ss.label_names == ["abnormal"] and len(ss) == 2
    by = {ss.case_ids[i]: i for i in range(len(ss))}
    i, j = by["normal/n.png"], by["abnormal/a.png"]
    np.testing.assert_allclose(np.asarray(ss.images[i, 0]), area_resize_ref(pad_square_ref(n8 / 255.0), 10) * 2 - 1, atol=1e-5)
    u = np.clip(a16 / np.percentile(a16.astype(np.float64), 99), 0, 1)
    np.testing.assert_allclose(np.asarray(ss.images[j, 0]), area_resize_ref(pad_square_ref(u), 10) * 2 - 1, atol=1e-5)
    assert ss.labels[:, 0].tolist() == [0.0, 1.0] or ss.labels[[i, j], 0].tolist() == [0.0, 1.0]
    assert ss.has_mask.all() and not np.asarray(ss.masks[i]).any() and np.asarray(ss.masks[j]).any()
    assert ss.geometry("abnormal/a.png").shape == (30, 20)
    # back on the original image grid
    back = ss.to_original("abnormal/a.png", np.asarray(ss.images[[j]]))
    assert back.shape == (1, 30, 20)


def test_prepare_csv_rgb_grade_bbox_split(tmp_path, home):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    write_png(tmp_path / "i" / "a.png", rgb)
    write_png(tmp_path / "i" / "b.png", rng.integers(0, 256, (20, 40), dtype=np.uint8))  # grey -> RGB
    (tmp_path / "labels.csv").write_text("file,nodule,grade,split,bbox_nodule\ni/a.png,1,2,train,4;2;12;8\ni/b.png,,,test,\n")
    ss = prepare(tmp_path, PreprocessConfig(size=20, intensity="nominal"))
    assert ss.channels == ["red", "green", "blue"] and ss.images.shape == (2, 3, 20, 20)
    np.testing.assert_allclose(np.asarray(ss.images[0]), area_resize_ref(pad_square_ref(np.moveaxis(rgb, -1, 0) / 255.0), 20) * 2 - 1, atol=1e-5)
    img1 = np.asarray(ss.images[1])
    np.testing.assert_allclose(img1[0], img1[2])  # grey replicated
    assert ss.grade[0] == 2 and math.isnan(ss.grade[1])
    assert ss.labels[0, 0] == 1 and math.isnan(ss.labels[1, 0])
    # 40 wide, 20 high -> padded by 10 rows above; scale 20/40
    np.testing.assert_allclose(ss.bbox["nodule"][0], [2.0, 6.0, 6.0, 9.0])
    assert np.isnan(ss.bbox["nodule"][1]).all()
    assert list(ss.split) == ["train", "test"]
    assert len(ss.split_subset("test")) == 1
    grey = prepare(tmp_path, PreprocessConfig(size=20, image_channels=1, intensity="nominal"))
    assert grey.channels == ["grey"]
    r, g_, b = np.moveaxis(rgb, -1, 0) / 255.0
    np.testing.assert_allclose(np.asarray(grey.images[0, 0]), area_resize_ref(pad_square_ref(0.299 * r + 0.587 * g_ + 0.114 * b), 20) * 2 - 1, atol=1e-5)


def test_prepare_npz_streams_rows(tmp_path, home):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    np.savez_compressed(tmp_path / "m.npz", train_images=imgs[:5], train_labels=np.array([[0], [1], [1], [0], [1]]),
                        val_images=imgs[5:], val_labels=np.array([[1], [0]]))
    ss = prepare(tmp_path / "m.npz", PreprocessConfig(size=14, intensity="nominal"))
    assert len(ss) == 7 and ss.channels == ["grey"]
    np.testing.assert_allclose(np.asarray(ss.images[:, 0]), imgs.reshape(7, 14, 2, 14, 2).mean(axis=(2, 4)) / 255 * 2 - 1, atol=1e-5)
    assert ss.labels[:, 0].tolist() == [0, 1, 1, 0, 1, 1, 0]
    assert list(ss.split) == ["train"] * 5 + ["val"] * 2


def test_slice_set_subset_and_items(tmp_path, home):
    root = write_brats(tmp_path / "b", n=2)
    ss = prepare(root, PreprocessConfig(size=8))
    idx = np.array([5, 1, 3])
    sub = ss.subset(idx)
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.images[:], np.asarray(ss.images)[idx])
    np.testing.assert_array_equal(sub.images[[2, 0]], np.asarray(ss.images)[idx[[2, 0]]])
    np.testing.assert_array_equal(sub.labels, ss.labels[idx])
    np.testing.assert_array_equal(sub.case_ids, ss.case_ids[idx])
    sub2 = sub.subset(np.array([True, False, True]))
    np.testing.assert_array_equal(sub2.slice_index, ss.slice_index[idx[[0, 2]]])
    item = ss[4]
    np.testing.assert_array_equal(item["image"], ss.images[4])
    assert item["case_id"] == ss.case_ids[4] and item["slice_index"] == ss.slice_index[4]
    counts = ss.label_counts()["unhealthy"]
    assert counts["positive"] + counts["negative"] + counts["unlabelled"] == len(ss)
    assert counts["positive"] == int(np.sum(ss.labels[:, 0] == 1)) > 0


def test_brain_mask_helper_is_not_degenerate():
    m = brain_mask()
    assert 0.2 < m.mean() < 0.6


def test_prepare_nnunet_3d_and_2d(tmp_path, home):
    import json

    from test_data_helpers import write_nii

    root = tmp_path / "Dataset003_Brain"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR", "1": "T1"}, "labels": {"background": 0, "tumour": 1},
                                                   "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(0)
    brain = brain_mask((10, 12, 6))
    flair = (rng.random((10, 12, 6)) * 100 + 1) * brain
    t1 = (rng.random((10, 12, 6)) * 50 + 1) * brain
    write_nii(root / "imagesTr" / "c1_0000.nii.gz", flair.astype(np.float32))
    write_nii(root / "imagesTr" / "c1_0001.nii.gz", t1.astype(np.float32))
    lab = np.zeros((10, 12, 6), np.uint8)
    lab[4:6, 5:7, 3] = 1
    write_nii(root / "labelsTr" / "c1.nii.gz", lab)
    ss = prepare(root, PreprocessConfig(size=12, modalities=("t1", "flair"), min_foreground=0))
    assert ss.kind == "nnunet" and ss.channels == ["t1", "flair"] and len(ss) == 6
    fg = (flair > 0) | (t1 > 0)
    p = np.percentile(t1[fg], 99)
    np.testing.assert_allclose(np.asarray(ss.images[2, 0]), area_resize_ref(pad_square_ref(np.clip(t1[:, :, 2] / p, 0, 1)), 12) * 2 - 1, atol=2e-5)
    assert ss.labels[:, 0].tolist() == [0, 0, 0, 1, 0, 0]
    # 2D nnU-Net: one grey png per channel, label png
    r2 = tmp_path / "Dataset004_2d"
    r2.mkdir()
    (r2 / "dataset.json").write_text(json.dumps({"channel_names": {"0": "a", "1": "b"}, "labels": {"background": 0, "x": 1}, "file_ending": ".png"}))
    a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    b = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    write_png(r2 / "imagesTr" / "k_0000.png", a)
    write_png(r2 / "imagesTr" / "k_0001.png", b)
    lab2 = np.zeros((8, 8), np.uint8)
    lab2[2, 3] = 1
    write_png(r2 / "labelsTr" / "k.png", lab2)
    ss2 = prepare(r2, PreprocessConfig(size=8, intensity="nominal"))
    assert ss2.channels == ["a", "b"] and ss2.images.shape == (1, 2, 8, 8)
    np.testing.assert_allclose(np.asarray(ss2.images[0]), np.stack([a, b]) / 255 * 2 - 1, atol=1e-5)
    assert ss2.labels[0, 0] == 1 and np.asarray(ss2.masks[0])[2, 3] == 1 and np.asarray(ss2.masks[0]).sum() == 1
