"""Real-world inputs read as the data says: orientation, grids, z-scored intensities, tiny images.

Every expected value comes from an independent computation: nibabel's own reorientation
(``as_reoriented`` / ``as_closest_canonical``) for the geometry, numpy on the original array for the
intensities, and the same image stored another way for the readers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, cli_env, run_cli
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from test_data_helpers import write_brats, write_png

from medcfx.data.check import check
from medcfx.demo import make_demo
from medcfx.data.geometry import grid_mismatch
from medcfx.data.preprocess import PreprocessConfig, prepare
from medcfx.errors import MedcfxError

DEMO_CASE = ROOT / "models" / "demo-inputs" / "brain" / "demo_case"


def restore(src: Path, dst: Path, codes: str) -> Path:
    """Store a NIfTI file's world image in the voxel order ``codes`` (nibabel's as_reoriented: same world)."""
    img = nib.load(str(src))
    to = ornt_transform(io_orientation(img.affine), axcodes2ornt(codes))
    out = img.as_reoriented(to)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(out.dataobj), out.affine), str(dst))
    assert "".join(nib.aff2axcodes(out.affine)) == codes
    return dst


def restore_tree(src: Path, dst: Path, codes: str) -> Path:
    """Copy a folder of NIfTI files, each re-stored in the voxel order ``codes``."""
    for f in sorted(src.rglob("*.nii.gz")):
        restore(f, dst / f.relative_to(src), codes)
    return dst


def world(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a NIfTI file in nibabel's closest canonical (RAS+) orientation."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


@pytest.fixture(scope="module")
def brains(tmp_path_factory):
    """A small demo BraTS set stored as RAS (as generated), and the same world images as LPS and PIR."""
    root = tmp_path_factory.mktemp("orient")
    make_demo("brain", root / "RAS", cases=2, seed=3, shape=(32, 28, 12), tumour_free_fraction=0.0)
    for codes in ("LPS", "PIR"):
        restore_tree(root / "RAS", root / codes, codes)
    return root


# ---------------------------------------------------------------------------------------------------------
# 1. geometry


@pytest.mark.parametrize("codes", ["LPS", "PIR"])
def test_prepare_sees_the_same_slices_whatever_the_storage_order(brains, codes, tmp_path, home):
    ras = prepare(brains / "RAS", PreprocessConfig(size=16))
    other = prepare(brains / codes, PreprocessConfig(size=16))
    assert other.cases == ras.cases
    assert other.notes.get(f"stored as {codes}: sliced after reorientation to RAS+; outputs are written back in "
                           f"the input's own voxel order and affine") == 2 and not ras.notes
    np.testing.assert_array_equal(other.slice_index, ras.slice_index)
    np.testing.assert_allclose(np.asarray(other.images), np.asarray(ras.images), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(other.masks), np.asarray(ras.masks))
    np.testing.assert_array_equal(other.labels, ras.labels)
    # results go back in the input's own voxel order and affine: the same world image
    case = ras.cases[0]
    rows = ras.case_rows(case)
    heat = (np.asarray(ras.images[rows])[:, 3] + 1) / 2
    a = ras.write_case(case, heat, tmp_path / "ras.nii.gz")
    b = other.write_case(case, heat, tmp_path / f"{codes}.nii.gz")
    assert "".join(nib.aff2axcodes(nib.load(str(b)).affine)) == codes
    src = next((brains / codes / case).glob("*_t1.nii.gz"))
    np.testing.assert_array_equal(nib.load(str(b)).affine, nib.load(str(src)).affine)
    (da, aa), (db, ab) = world(a), world(b)
    np.testing.assert_allclose(ab, aa, atol=1e-6)
    np.testing.assert_allclose(db, da, atol=1e-6)


def test_axial_slices_are_chosen_from_the_affine(brains, home):
    """PIR storage puts the superior-inferior axis at voxel axis 1: the slices must still be axial."""
    ss = prepare(brains / "PIR", PreprocessConfig(size=16, min_foreground=0))
    case = ss.cases[0]
    shape = nib.load(str(next((brains / "PIR" / case).glob("*_t1.nii.gz")))).shape
    assert len(ss.case_rows(case)) == shape[1]  # one model slice per voxel along S-I (storage axis 1)
    assert ss.geometry(case).canonical_shape == (32, 28, 12)


def test_explain_heatmaps_agree_in_world_space(brains, tmp_path, home):
    """explain (real CLI) of the demo case stored as RAS and as LPS: one slice with the sanchez demo model,
    every slice with the threshold baseline; the written maps agree after as_closest_canonical."""
    lps = restore_tree(DEMO_CASE, tmp_path / "lps" / "demo_case", "LPS")
    env = cli_env(home)
    for src, out in ((DEMO_CASE, tmp_path / "a"), (lps, tmp_path / "b")):
        run_cli(["explain", src, "--method", "threshold", "--out", out / "thr"], env=env, check=0)
        r = run_cli(["explain", src, "--model", "sanchez-demo", "--slice", "6", "--out", out / "cf"], env=env, check=0)
    assert "stored as LPS" in r.stdout + r.stderr  # the user is told
    for name in ("thr/demo_case/heatmap.nii.gz", "cf/demo_case/heatmap.nii.gz", "cf/demo_case/counterfactual_flair.nii.gz"):
        (da, aa), (db, ab) = world(tmp_path / "a" / name), world(tmp_path / "b" / name)
        np.testing.assert_allclose(ab, aa, atol=1e-6)
        np.testing.assert_allclose(db, da, atol=1e-4)
        assert np.abs(da).max() > 0
    prov = json.loads((tmp_path / "b" / "cf" / "demo_case" / "provenance.json").read_text())
    assert any("stored as LPS" in n for n in prov["notes"])


def test_evaluate_metrics_do_not_depend_on_the_storage_order(brains, tmp_path, home):
    env = cli_env(home)
    got = {}
    for codes in ("RAS", "LPS"):
        run_cli(["evaluate", "threshold", "--data", brains / codes, "--out", tmp_path / codes,
                 "--set", "preprocess.size=16", "--n-resamples", "20"], env=env, check=0)
        got[codes] = json.loads((tmp_path / codes / "metrics.json").read_text())
    for key in ("pixel_AUPRC", "pixel_AUROC", "pixel_ideal_Dice_oracle"):
        assert got["LPS"]["metrics"][key] == pytest.approx(got["RAS"]["metrics"][key], abs=1e-6)
    assert got["LPS"]["counts"] == got["RAS"]["counts"]  # the same voxels scored
    assert got["LPS"]["slices"] == got["RAS"]["slices"]


def test_grids_must_agree_shape_and_affine(tmp_path, home):
    root = write_brats(tmp_path / "b", n=1)
    case = root / "BraTS_000"
    seg = case / "BraTS_000_seg.nii.gz"
    img = nib.load(str(seg))
    # the same array with a flipped affine (a segmentation saved in another orientation): same shape
    flipped = img.affine @ np.diag([-1.0, 1, 1, 1])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), flipped), str(seg))
    assert grid_mismatch(img.shape, img.affine, img.shape, flipped) is not None
    with pytest.raises(MedcfxError, match=r"segmentation \(BraTS_000_seg.nii.gz\) is not on the grid of t1 .*same shape"):
        prepare(root, PreprocessConfig(size=8))
    report = check(root)
    assert any("is not on the grid" in p and "BraTS_000_seg.nii.gz" in p for p in report.problems)
    # a rounding in the 7th digit of the affine is the same grid
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine + 1e-7), str(seg))
    assert check(root).ok
    prepare(root, PreprocessConfig(size=8))


# ---------------------------------------------------------------------------------------------------------
# 2. intensity


def _zscore_copy(src: Path, dst: Path) -> Path:
    """The case with every modality z-scored over its brain (x != 0), background left 0, as public
    preprocessing pipelines store it."""
    for f in sorted(src.glob("*.nii.gz")):
        img = nib.load(str(f))
        x = np.asarray(img.get_fdata(), dtype=np.float64)
        if not f.name.endswith("_seg.nii.gz"):
            fg = x != 0
            x[fg] = (x[fg] - x[fg].mean()) / x[fg].std()
        dst.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(x.astype(np.float32), img.affine), str(dst / f.name))
    return dst


def test_z_scored_case_keeps_its_brain_and_is_scaled_like_the_original(tmp_path, home):
    z = _zscore_copy(DEMO_CASE, tmp_path / "z" / "demo_case")
    raw_ss = prepare(DEMO_CASE, PreprocessConfig(size=48, min_foreground=0))
    z_ss = prepare(z, PreprocessConfig(size=48, min_foreground=0))
    np.testing.assert_array_equal(z_ss.slice_index, raw_ss.slice_index)
    # brute force from the ORIGINAL intensities: foreground = any modality != 0; the z-scored copy must be
    # scaled as (x - min) / (p - min) of the original, background 0 (z-scoring is affine, the percentile
    # and the minimum follow it)
    vols = [np.asarray(nib.load(str(DEMO_CASE / f"demo_case_{m}.nii.gz")).get_fdata(), dtype=np.float64)
            for m in ("t1", "t1ce", "t2", "flair")]
    fg = np.any([v != 0 for v in vols], axis=0)
    from medcfx.data.geometry import SliceGeometry

    geom = z_ss.geometry("demo_case")
    for c, x in enumerate(vols):
        lo, p = x[fg].min(), np.percentile(x[fg], 99)
        u = np.where(fg, np.clip((x - lo) / (p - lo), 0, 1), 0)
        want = SliceGeometry(geom.shape, geom.axis, geom.size, geom.kept, geom.ornt).to_model(u.astype(np.float32)) * 2 - 1
        np.testing.assert_allclose(np.asarray(z_ss.images)[:, c], want, atol=2e-5)
        # and the raw case is x / p exactly as before (lo = 0 for non-negative MRI)
        assert lo >= 0
        want_raw = geom.to_model(np.where(fg, np.clip(x / p, 0, 1), 0).astype(np.float32)) * 2 - 1
        np.testing.assert_allclose(np.asarray(raw_ss.images)[:, c], want_raw, atol=2e-5)
    # the brain is not lost: the model-sized foreground (> -1) is the same in both
    assert np.array_equal(np.asarray(z_ss.images) > -1 + 1e-6, np.asarray(raw_ss.images) > -1 + 1e-6) or \
        np.mean((np.asarray(z_ss.images) > -1 + 1e-6) != (np.asarray(raw_ss.images) > -1 + 1e-6)) < 1e-3


def test_all_zero_case_is_reported_by_check_and_refused_by_prepare(tmp_path, home):
    root = write_brats(tmp_path / "b", n=2)
    for f in (root / "BraTS_001").glob("*.nii.gz"):
        img = nib.load(str(f))
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(f))
    report = check(root)
    assert any("case BraTS_001: no foreground" in p for p in report.problems), report.problems
    with pytest.raises(MedcfxError, match="case BraTS_001: no foreground"):
        prepare(root, PreprocessConfig(size=8))


def test_background_other_than_zero_is_found_at_the_corners(tmp_path, home):
    """A CT-like volume with background -1024: the foreground is what differs from it, not what is > 0."""
    root = write_brats(tmp_path / "b", n=1)
    ss0 = prepare(root, PreprocessConfig(size=8, min_foreground=0))
    for f in (root / "BraTS_000").glob("*_t[12].nii.gz"):
        img = nib.load(str(f))
        x = np.asarray(img.get_fdata(), np.float32)
        nib.save(nib.Nifti1Image(np.where(x != 0, x, -1024).astype(np.float32), img.affine), str(f))
    ss1 = prepare(root, PreprocessConfig(size=8, min_foreground=0))
    assert ss1.fingerprint != ss0.fingerprint
    # t1 / t2 shifted by their foreground minimum (here -0 ... the brain stays >= 0) and background 0:
    # the same numbers as the zero-background copy
    np.testing.assert_allclose(np.asarray(ss1.images), np.asarray(ss0.images), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 4. checked before use


def test_tiny_images_are_refused_by_explain_and_grade(tmp_path, home):
    env = cli_env(home)
    for side in (1, 3):
        f = write_png(tmp_path / f"tiny{side}.png", np.full((side, side), 128, np.uint8))
        for args in (["explain", f, "--method", "mediffusion", "--target", "no-cardiomegaly", "--out", tmp_path / "o"],
                     ["grade", f, "--out", tmp_path / "g"]):
            r = run_cli(args, env=env)
            assert r.returncode != 0
            assert f"{side} x {side} pixels; medcfx needs at least 16 x 16" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()
    report = check(tmp_path)
    assert any("smaller than 16 x 16" in i for i in report.info)


# ---------------------------------------------------------------------------------------------------------
# 2b. the same 2D content in every storage reaches the model as the same array


def _storages(tmp_path: Path, x8: np.ndarray) -> dict[str, Path]:
    """One 8-bit grey image stored every way users have it."""
    from PIL import Image
    from test_dicom import dcm

    lo, hi = int(x8.min()), int(x8.max())
    out = {
        "png8": write_png(tmp_path / "a8.png", x8),
        "png16": write_png(tmp_path / "a16.png", x8.astype(np.uint16) * 257),  # the standard 8 -> 16 widening
        "rgb": tmp_path / "rgb.png",
        "palette": tmp_path / "pal.png",
        "jpeg": tmp_path / "a.jpg",
        "dicom8": dcm(tmp_path / "d8.dcm", x8, bits=8),
        "dicom15": dcm(tmp_path / "IM0001", x8, bits=15),  # no suffix: found by its DICM marker
        "mono1": dcm(tmp_path / "m1.IMA", lo + hi - x8.astype(np.int32), bits=15, photometric="MONOCHROME1"),
        # the complement over the nominal 15 bits, as most writers store MONOCHROME1
        "mono1n": dcm(tmp_path / "m1n.dcm", 32767 - x8.astype(np.int32), bits=15, photometric="MONOCHROME1"),
        # 12 stored bits mapped onto 0..255 by the modality LUT
        "slope": dcm(tmp_path / "slope.dcm", np.round(x8 * (4095 / 255)).astype(np.int32), bits=12,
                     tags={"RescaleSlope": f"{255 / 4095:.10f}", "RescaleIntercept": "0"}),
    }
    Image.fromarray(np.stack([x8] * 3, -1)).save(out["rgb"])
    Image.fromarray(x8).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(out["palette"])
    Image.fromarray(x8).save(out["jpeg"], quality=100, subsampling=0)
    return out


@pytest.fixture(scope="module")
def cxr8():
    from PIL import Image

    x = np.asarray(Image.open(ROOT / "models" / "demo-inputs" / "cxr.png"))
    assert x.dtype == np.uint8
    return x


def test_every_storage_of_one_image_gives_the_same_model_input(tmp_path, cxr8):
    """percentile rule: every storage within rounding (JPEG: within its own compression error)."""
    from PIL import Image

    from medcfx.inputs import load_image

    files = _storages(tmp_path, cxr8)
    cfg = PreprocessConfig(size=64)
    ref = load_image(files["png8"], cfg, 1).images[0]
    assert cxr8.min() == 0  # a radiograph with a black border: its MONOCHROME1 copies lose no offset
    for kind in ("png16", "rgb", "dicom8", "dicom15", "mono1", "mono1n"):
        np.testing.assert_allclose(load_image(files[kind], cfg, 1).images[0], ref, atol=2e-6, err_msg=kind)
    pal = np.asarray(Image.open(files["palette"]).convert("L"))  # what the palette indices stand for
    assert np.array_equal(pal, cxr8)  # <= 256 grey levels: the adaptive palette is exact
    np.testing.assert_allclose(load_image(files["palette"], cfg, 1).images[0], ref, atol=2e-6)
    jpg = load_image(files["jpeg"], cfg, 1).images[0]
    assert np.abs(jpg - ref).mean() < 4 / 255  # quality 100: about a grey level per pixel


def test_nominal_rule_is_storage_invariant_for_widened_integers(tmp_path, cxr8):
    from medcfx.inputs import load_image

    files = _storages(tmp_path, cxr8)
    cfg = PreprocessConfig(size=64, intensity="nominal")
    ref = load_image(files["png8"], cfg, 1)
    want = load_image(files["png8"], PreprocessConfig(size=64, intensity="legacy"), 1).images[0]  # / 255
    np.testing.assert_allclose(ref.images[0], want, atol=1e-6)
    for kind in ("png16", "rgb", "dicom8"):
        np.testing.assert_allclose(load_image(files[kind], cfg, 1).images[0], ref.images[0], atol=2e-6, err_msg=kind)
    # a RescaleSlope mapping 12 stored bits onto 0..255: scaled over that nominal range, not by its percentile
    np.testing.assert_allclose(load_image(files["slope"], cfg, 1).images[0], ref.images[0], atol=2 * 0.5 / 255)
    # 8-bit content in a 15-bit DICOM: scaled by 32767 it is dark, and the user is told
    dark = load_image(files["dicom15"], cfg, 1)
    assert dark.images[0].max() < -0.9
    assert any("less than 1/16 of its nominal range 0..32767" in n for n in dark.notes)
    # MONOCHROME1 and MONOCHROME2 copies agree under every rule
    np.testing.assert_allclose(load_image(files["mono1"], cfg, 1).images[0], dark.images[0], atol=2e-6)
    np.testing.assert_allclose(load_image(files["mono1n"], cfg, 1).images[0], dark.images[0], atol=2e-6)


def test_bundled_cxr_model_gives_the_same_findings_for_8_and_16_bit_copies(tmp_path, cxr8, home):
    """The issue's example: the bundled mediffusion model (nominal rule, recorded in its entry) on the demo
    radiograph stored as 8-bit and 16-bit PNG."""
    env = cli_env(home)
    a = write_png(tmp_path / "a8.png", cxr8)
    b = write_png(tmp_path / "a16.png", cxr8.astype(np.uint16) * 257)
    got = []
    for f in (a, b):
        run_cli(["predict", f, "--method", "mediffusion", "--out", tmp_path / f.stem], env=env, check=0)
        got.append((tmp_path / f.stem / "predictions.csv").read_text().splitlines()[1].split(",")[1:])
    assert got[0] == got[1]
    # 8-bit content in a 15-bit DICOM reaches this model dark: predict says so
    from test_dicom import dcm

    r = run_cli(["predict", dcm(tmp_path / "IM15", cxr8, bits=15), "--method", "mediffusion"], env=env, check=0)
    assert "note: IM15: uses less than 1/16 of its nominal range 0..32767" in r.stdout + r.stderr


def test_grade_reads_an_rgb_copy_of_grey_content_like_the_grey_file(tmp_path, home):
    """One reader and one channel rule for every command: grade takes the RGB PNG of grey content and
    grades it exactly as the grey file (both 8-bit, same content)."""
    from PIL import Image

    x16 = np.asarray(Image.open(ROOT / "models" / "demo-inputs" / "vertebra.png")).astype(np.float64)
    x8 = np.round((x16 - x16.min()) / (x16.max() - x16.min()) * 255).astype(np.uint8)
    grey = write_png(tmp_path / "grey.png", x8)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.stack([x8] * 3, -1)).save(rgb)
    env = cli_env(home)
    out = {}
    for f in (grey, rgb):
        run_cli(["grade", f, "--out", tmp_path / f.stem], env=env, check=0)
        out[f.stem] = json.loads(next((tmp_path / f.stem).rglob("result.json")).read_text())
    assert out["rgb"]["grade"] == pytest.approx(out["grey"]["grade"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 3. one reader: a DICOM series and a Decathlon 4D file are the volumes they hold


def _nifti_as_dicom_series(src: Path, folder: Path) -> None:
    """Write a RAS-stored NIfTI volume as a DICOM series (LPS patient coordinates), one extension-less file
    per axial slice, in shuffled order."""
    from pydicom.uid import generate_uid
    from test_dicom import dcm

    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    assert "".join(nib.aff2axcodes(img.affine)) == "RAS" and data.min() >= 0
    sx, sy, sz = (float(z) for z in img.header.get_zooms()[:3])
    o = img.affine[:3, 3]
    uid = generate_uid()
    for n, k in enumerate(np.random.default_rng(0).permutation(data.shape[2])):
        dcm(folder / f"IM{n:04d}", data[:, :, k].T, bits=16, modality="MR", tags={
            "SeriesInstanceUID": uid, "ImageOrientationPatient": ["-1", "0", "0", "0", "-1", "0"],
            "ImagePositionPatient": [f"{-o[0]:.6f}", f"{-o[1]:.6f}", f"{o[2] + k * sz:.6f}"],
            "PixelSpacing": [f"{sy:g}", f"{sx:g}"], "SliceThickness": f"{sz:g}"})


def test_dicom_series_folder_is_explained_like_its_nifti(tmp_path, home):
    """restoration-demo is a one-channel (T2) model: the demo case's T2 as a DICOM series folder and as
    NIfTI give the same anomaly map in world space (real CLI)."""
    t2 = DEMO_CASE / "demo_case_t2.nii.gz"
    series = tmp_path / "series"
    _nifti_as_dicom_series(t2, series)
    env = cli_env(home)
    for src, out in ((t2, tmp_path / "a"), (series, tmp_path / "b")):
        run_cli(["explain", src, "--model", "restoration-demo", "--slice", "6", "--out", out], env=env, check=0)
    (da, aa), (db, ab) = world(next((tmp_path / "a").rglob("heatmap.nii.gz"))), world(next((tmp_path / "b").rglob("heatmap.nii.gz")))
    np.testing.assert_allclose(ab, aa, atol=1e-4)
    np.testing.assert_allclose(db, da, atol=1e-5)
    assert da.max() > 0


def test_decathlon_4d_dataset_prepares_like_the_brats_layout_of_the_same_volumes(tmp_path, home):
    """Medical Segmentation Decathlon Task01: one 4D file per case (FLAIR, T1w, t1gd, T2w) + dataset.json."""
    brats = write_brats(tmp_path / "brats", n=2)
    dec = tmp_path / "Task01_BrainTumour"
    (dec / "imagesTr").mkdir(parents=True)
    (dec / "labelsTr").mkdir()
    training = []
    order = ("flair", "t1", "t1ce", "t2")
    for case in sorted(p.name for p in brats.iterdir()):
        vols = [nib.load(str(brats / case / f"{case}_{m}.nii.gz")) for m in order]
        four = np.stack([np.asarray(v.dataobj, np.float32) for v in vols], axis=-1)
        nib.save(nib.Nifti1Image(four, vols[0].affine), str(dec / "imagesTr" / f"{case}.nii.gz"))
        shutil.copy(brats / case / f"{case}_seg.nii.gz", dec / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (dec / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(training), "training": training, "test": []}))
    assert check(dec).ok, check(dec).problems
    a = prepare(brats, PreprocessConfig(size=8))
    b = prepare(dec, PreprocessConfig(size=8))
    assert b.kind == "decathlon" and b.channels == a.channels == ["t1", "t1ce", "t2", "flair"]
    np.testing.assert_array_equal(np.asarray(b.images), np.asarray(a.images))
    np.testing.assert_array_equal(np.asarray(b.masks), np.asarray(a.masks))
    # explain writes its maps on the 4D file's 3D grid, equal to those of the BraTS copy
    env = cli_env(home)
    run_cli(["explain", brats, "--method", "threshold", "--set", "preprocess.size=8", "--out", tmp_path / "ea"], env=env, check=0)
    run_cli(["explain", dec, "--method", "threshold", "--set", "preprocess.size=8", "--out", tmp_path / "eb"], env=env, check=0)
    for case in a.cases:
        ha, hb = nib.load(str(tmp_path / "ea" / case / "heatmap.nii.gz")), nib.load(str(tmp_path / "eb" / case / "heatmap.nii.gz"))
        assert hb.shape == ha.shape == nib.load(str(brats / case / f"{case}_t1.nii.gz")).shape
        np.testing.assert_array_equal(hb.affine, ha.affine)
        np.testing.assert_array_equal(np.asarray(hb.dataobj), np.asarray(ha.dataobj))


# ---------------------------------------------------------------------------------------------------------
# the intensity rule is recorded with a model and replayed


def test_intensity_rule_is_recorded_and_old_entries_replay_the_legacy_rule():
    from medcfx.registry import Entry
    from medcfx_diffae import DEFAULTS as DIFFAE
    from medcfx_mediffusion.methods import AE_DEFAULTS
    from medcfx_restoration.config import DEFAULTS as RESTORATION
    from medcfx_sanchez.networks import DEFAULTS as SANCHEZ

    for defaults in (DIFFAE, AE_DEFAULTS, RESTORATION, SANCHEZ):  # what every trainer stores with its model
        assert defaults["preprocess"]["intensity"] == "percentile"
    art = {"weights": {"path": "w", "sha256": "0" * 64, "bytes": 1}}
    old = Entry.from_dict({"name": "m", "version": 1, "method": "x", "artifacts": art,
                           "config": {"preprocess": {"size": 8}, "ae": {"preprocess": {"size": 8}},
                                      "ensemble": [{"preprocess": {"size": 8}}]}})
    assert old.config["preprocess"]["intensity"] == "legacy"
    assert old.config["ae"]["preprocess"]["intensity"] == "legacy"
    assert old.config["ensemble"][0]["preprocess"]["intensity"] == "legacy"
    new = Entry.from_dict({"name": "m", "version": 1, "method": "x", "artifacts": art,
                           "config": {"preprocess": {"size": 8, "intensity": "nominal"}}})
    assert new.config["preprocess"]["intensity"] == "nominal"


def test_ct_in_hu_is_scaled_by_the_fixed_window_whatever_its_storage_or_display_window(tmp_path):
    """Two CT files of the same HU (other rescale, other display window) reach the model as one array:
    clip((HU + 1024) / 4095), computed here and resized by the same geometry."""
    from test_dicom import dcm

    from medcfx.data.geometry import SliceGeometry
    from medcfx.inputs import load_image

    hu = np.random.default_rng(5).integers(-1000, 2000, (24, 20)) // 2 * 2  # even HU: exact in both files
    a = dcm(tmp_path / "a.dcm", (hu + 1024).astype(np.uint16), modality="CT",
            tags={"RescaleSlope": "1", "RescaleIntercept": "-1024", "WindowCenter": "40", "WindowWidth": "400"})
    b = dcm(tmp_path / "b", ((hu + 2048) // 2).astype(np.uint16), modality="CT",
            tags={"RescaleSlope": "2", "RescaleIntercept": "-2048", "WindowCenter": "500", "WindowWidth": "2000"})
    cfg = PreprocessConfig(size=16)
    want = SliceGeometry((24, 20), None, 16, (0,)).to_model(np.clip((hu[None] + 1024) / 4095, 0, 1).astype(np.float32))[0] * 2 - 1
    for f in (a, b):
        np.testing.assert_allclose(load_image(f, cfg, 1).images[0], want, atol=1e-6)


def test_error_lines_show_file_names_verbatim_even_with_brackets(tmp_path, home):
    """rich would swallow '[bold]' in a path as markup: errors are printed escaped."""
    f = tmp_path / "scan[bold]01.png"
    r = run_cli(["explain", f, "--method", "mediffusion", "--target", "no-cardiomegaly"], env=cli_env(home))
    assert r.returncode != 0 and "scan[bold]01.png" in r.stderr, r.stderr


def test_a_constant_channel_is_refused_by_prepare_and_reported_by_check(tmp_path, home):
    """A modality constant over the brain (a mask saved as T1ce, an empty export) carries no contrast."""
    root = write_brats(tmp_path / "b", n=2)
    for case, value in (("BraTS_000", 100.0), ("BraTS_001", 0.0)):
        f = root / case / f"{case}_t1ce.nii.gz"
        img = nib.load(str(f))
        x = np.asarray(img.get_fdata(), np.float32)
        nib.save(nib.Nifti1Image(np.where(x != 0, value, 0).astype(np.float32), img.affine), str(f))
    problems = "\n".join(check(root).problems)
    assert "BraTS_000_t1ce.nii.gz): constant over the foreground" in problems
    assert "BraTS_001_t1ce.nii.gz): constant over the foreground" in problems
    with pytest.raises(MedcfxError, match="t1ce .*constant over the foreground"):
        prepare(root, PreprocessConfig(size=8))


def test_what_the_header_leaves_open_is_said(brains, tmp_path, home):
    """No orientation codes: the voxel axes are used as stored (not nibabel's fallback affine), with a note;
    qform and sform that disagree, and an oblique affine: notes."""
    src = brains / "LPS"
    case = sorted(p.name for p in src.iterdir())[0]
    nocode = tmp_path / "nocode" / case
    for f in sorted((src / case).glob("*.nii.gz")):
        img = nib.load(str(f))
        out = nib.Nifti1Image(np.asarray(img.dataobj), None)
        out.set_qform(None, code=0)
        out.set_sform(None, code=0)
        nocode.mkdir(parents=True, exist_ok=True)
        nib.save(out, str(nocode / f.name))
    a = prepare(src, PreprocessConfig(size=16, min_foreground=0))
    b = prepare(nocode.parent, PreprocessConfig(size=16, min_foreground=0))
    # as stored: the LPS arrays sliced along voxel axis 2 without flips (= the LPS case's slices flipped back)
    np.testing.assert_allclose(np.asarray(b.images), np.asarray(a.images[a.case_rows(case)])[:, :, ::-1, ::-1], atol=1e-6)
    assert any("no orientation in the header" in i for i in check(nocode.parent).info)
    # qform LPS, sform RAS: a note
    dis = tmp_path / "dis" / case
    shutil.copytree(brains / "RAS" / case, dis)
    for f in sorted(dis.glob("*.nii.gz")):
        img = nib.load(str(f))
        img.set_qform(img.affine @ np.diag([-1.0, -1, 1, 1]), code=1)
        nib.save(img, str(f))
    assert any("qform and sform disagree" in i for i in check(dis.parent).info)
    # oblique by 5 degrees about z: a note
    obl = tmp_path / "obl" / case
    c, s_ = np.cos(np.radians(5)), np.sin(np.radians(5))
    rot = np.array([[c, -s_, 0, 0], [s_, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    for f in sorted((brains / "RAS" / case).glob("*.nii.gz")):
        img = nib.load(str(f))
        obl.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), rot @ img.affine), str(obl / f.name))
    assert any("oblique by up to 5.0 degrees" in i for i in check(obl.parent).info)


def test_a_dicom_series_folder_is_one_volume_for_check_and_prepare_too(tmp_path, home):
    t2 = DEMO_CASE / "demo_case_t2.nii.gz"
    series = tmp_path / "t2_series"
    _nifti_as_dicom_series(t2, series)
    report = check(series)
    assert report.ok and report.kind == "dicom" and report.shapes == {"x".join(map(str, nib.load(str(t2)).shape)): 1}
    nifti_case = tmp_path / "nii" / "demo_case"
    nifti_case.mkdir(parents=True)
    shutil.copy(t2, nifti_case / "demo_case_t2.nii.gz")
    a = prepare(nifti_case, PreprocessConfig(size=16, modalities=("t2",)))
    b = prepare(series, PreprocessConfig(size=16, modalities=("t2",)))
    assert b.kind == "dicom" and len(b) == len(a)
    np.testing.assert_allclose(np.asarray(b.images), np.asarray(a.images), atol=1e-6)
    # a missing slice is a problem check reports (not a folder of 2D images)
    sorted(series.iterdir())[3].unlink()
    assert any("not evenly spaced" in p for p in check(series).problems)
