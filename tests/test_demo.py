"""Offline demo datasets (medcfx.demo): layouts on disk, determinism, what the data models, atomicity.

Files are read back with nibabel / Pillow / csv directly (not with medcfx's readers), and the modelled
properties are measured from the written arrays, not taken from the generator's own bookkeeping.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medcfx import demo
from medcfx.demo import DEMO_KINDS, make_demo
from medcfx.demo import brain as demo_brain
from medcfx.demo import chest as demo_chest
from medcfx.demo import vertebra as demo_vertebra
from medcfx.demo.common import case_rng
from medcfx.errors import UsageError

TINY = (48, 48, 31)  # 5 mm voxels: fast, still every structure
SMALL = (80, 80, 52)  # 3 mm voxels: enough pure-tissue voxels to compare contrasts


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def _nii(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


# ======================================================================================= entry point


def test_unknown_kind_and_option_are_usage_errors(tmp_path):
    with pytest.raises(UsageError) as e:
        make_demo("knee", tmp_path / "x")
    for k in DEMO_KINDS:
        assert k in str(e.value)
    with pytest.raises(UsageError, match="bogus"):
        make_demo("chest", tmp_path / "x", cases=2, bogus=1)
    with pytest.raises(UsageError, match="cases"):
        make_demo("chest", tmp_path / "x", cases=0)
    with pytest.raises(UsageError, match="unlabelled_fraction"):
        make_demo("chest", tmp_path / "x", cases=2, unlabelled_fraction=1.5)
    assert not (tmp_path / "x").exists()
    assert set(demo.demo_options("brain")) >= {"shape", "tumour_free_fraction", "anatomy"}


def test_refuses_nonempty_output_unless_overwrite(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        make_demo("chest", out, cases=2, size=64)
    assert (out / "keep.txt").read_text() == "mine"
    make_demo("chest", out, cases=2, size=64, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "labels.csv").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    make_demo("chest", empty, cases=1, size=64)  # an empty folder is fine
    assert (empty / "labels.csv").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        make_demo("chest", tmp_path / "file", cases=1)


@pytest.mark.parametrize("kind", ["chest", "vertebra", "brain"])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, kind):
    calls = {"n": 0}
    target = {"chest": (demo_chest, "chest_image"), "vertebra": (demo_vertebra, "vertebra_image"),
              "brain": (demo_brain, "_save_nifti")}[kind]
    real = getattr(*target)

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(*target, flaky)
    opts = {"brain": {"shape": TINY}, "chest": {"size": 64}, "vertebra": {"size": 64}}[kind]
    with pytest.raises(RuntimeError, match="simulated"):
        make_demo(kind, tmp_path / "out", cases=4, **opts)
    assert not (tmp_path / "out").exists()
    assert _no_leftovers(tmp_path, "out")
    # an existing dataset survives a failed overwrite untouched
    monkeypatch.setattr(*target, real)
    make_demo(kind, tmp_path / "out", cases=1, **opts)
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    calls["n"] = 0
    monkeypatch.setattr(*target, flaky)
    with pytest.raises(RuntimeError):
        make_demo(kind, tmp_path / "out", cases=4, overwrite=True, **opts)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before
    assert _no_leftovers(tmp_path, "out")


# ======================================================================================= brain


@pytest.fixture(scope="module")
def brain_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "brats"
    make_demo("brain", out, cases=4, seed=3, shape=TINY, tumour_free_fraction=0.25)
    return out


def test_brain_layout_on_disk(brain_set):
    cases = sorted(p.name for p in brain_set.iterdir())
    assert cases == [f"demo_{i:05d}" for i in range(4)]
    aff = demo_brain.brain_affine(TINY)
    for c in cases:
        files = sorted(p.name for p in (brain_set / c).iterdir())
        assert files == sorted(f"{c}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
        imgs = {m: nib.load(str(brain_set / c / f"{c}_{m}.nii.gz")) for m in ("t1", "t1ce", "t2", "flair", "seg")}
        for m, im in imgs.items():
            assert im.shape == TINY
            np.testing.assert_allclose(im.affine, aff, atol=1e-4)
            assert nib.aff2axcodes(im.affine) == ("R", "A", "S")
            assert im.get_data_dtype() == (np.uint8 if m == "seg" else np.int16)
        np.testing.assert_allclose(imgs["t1"].header.get_zooms(), (5.0, 5.0, 155 / 31), atol=1e-4)
        seg = np.asanyarray(imgs["seg"].dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        t1 = np.asanyarray(imgs["t1"].dataobj)
        brain = t1 > 0
        # skull-stripped: every channel is 0 outside one common brain mask, positive inside; seg inside it
        for m in ("t1ce", "t2", "flair"):
            np.testing.assert_array_equal(np.asanyarray(imgs[m].dataobj) > 0, brain)
        assert not seg[~brain].any()
        assert 0.05 < brain.mean() < 0.5
        assert not brain[0].any() and not brain[-1].any()  # the head does not touch the border


def test_brain_tumour_free_fraction_exact(brain_set, tmp_path):
    segs = [_nii(brain_set / c / f"{c}_seg.nii.gz") for c in sorted(p.name for p in brain_set.iterdir())]
    assert sum(not s.any() for s in segs) == 1  # round(0.25 * 4)
    tumours = [s for s in segs if s.any()]
    assert all((s == 2).any() for s in tumours)  # every tumour has oedema
    out = make_demo("brain", tmp_path / "b2", cases=5, seed=1, shape=(24, 24, 16), tumour_free_fraction=0.6)
    n_free = sum(not _nii(p / f"{p.name}_seg.nii.gz").any() for p in out.iterdir())
    assert n_free == 3


def test_brain_deterministic(brain_set, tmp_path):
    same = make_demo("brain", tmp_path / "again", cases=2, seed=3, shape=TINY)
    other = make_demo("brain", tmp_path / "other", cases=2, seed=4, shape=TINY)
    for c in ("demo_00000", "demo_00001"):
        for m in ("t1", "flair", "seg"):
            a = _nii(brain_set / c / f"{c}_{m}.nii.gz")
            np.testing.assert_array_equal(a, _nii(same / c / f"{c}_{m}.nii.gz"))
        assert not np.array_equal(_nii(brain_set / c / f"{c}_t1.nii.gz"), _nii(other / c / f"{c}_t1.nii.gz"))


def _tumour_case(anatomy: str, shape=SMALL, min_voxels: int = 20) -> dict:
    """The first case that has all three tumour labels, each with at least ``min_voxels`` voxels."""
    for i in range(20):
        res = demo_brain.brain_case(case_rng("brain", 11, i), shape, tumour=True, anatomy=anatomy)
        if all((res["seg"] == k).sum() >= min_voxels for k in (1, 2, 4)):
            return res
    raise AssertionError("no high-grade tumour in 20 draws")


@pytest.mark.parametrize("anatomy", ["template", "procedural"])
def test_brain_tissue_contrasts(anatomy):
    if anatomy == "template" and demo_brain.nilearn_template_dir() is None:
        pytest.skip("nilearn not installed")
    res = _tumour_case(anatomy)
    assert res["params"]["anatomy"] == anatomy
    seg, t = res["seg"], res["tissue"]
    normal = seg == 0
    masks = {k: (t[k] > 0.8) & normal & res["brain"] for k in ("csf", "gm", "wm")}
    assert all(m.sum() > 30 for m in masks.values())
    mean = {m: {k: float(res["images"][m][v].mean()) for k, v in masks.items()} for m in ("t1", "t2", "flair")}
    assert mean["t1"]["wm"] > mean["t1"]["gm"] > mean["t1"]["csf"]
    assert mean["t2"]["csf"] > mean["t2"]["gm"] > mean["t2"]["wm"]
    assert mean["flair"]["gm"] > mean["flair"]["wm"] > mean["flair"]["csf"]
    assert mean["flair"]["gm"] < 1.4 * mean["flair"]["wm"]  # "GM > WM slightly"
    assert mean["flair"]["csf"] < 0.45 * mean["flair"]["wm"]  # CSF suppressed
    # lesions: oedema bright in FLAIR and T2, necrosis darker than oedema in FLAIR and dark in T1
    oed, nec = seg == 2, seg == 1
    fl = res["images"]["flair"]
    assert fl[oed].mean() > mean["flair"]["gm"] and fl[nec].mean() < fl[oed].mean()
    assert res["images"]["t2"][oed].mean() > mean["t2"]["wm"]
    assert res["images"]["t1"][nec].mean() < mean["t1"]["gm"]


def test_brain_enhancement_only_in_t1ce():
    res = _tumour_case("auto", min_voxels=100)  # a necrosis large enough to have voxels away from the rim
    t1 = res["images"]["t1"].astype(float)
    t1ce = res["images"]["t1ce"].astype(float)
    seg, tis = res["seg"], res["tissue"]
    enh = seg == 4
    grown = enh.copy()  # enhancing tumour grown by one voxel: its partial-volume border
    for ax in range(3):
        for sh in (-1, 1):
            grown |= np.roll(enh, sh, axis=ax)
    regions = {
        "enhancing": enh,
        "necrosis": (seg == 1) & ~grown,
        "oedema": (seg == 2) & ~grown,
        "wm": (tis["wm"] > 0.8) & (seg == 0),
        "gm": (tis["gm"] > 0.8) & (seg == 0),
        "csf": (tis["csf"] > 0.8) & (seg == 0),
    }
    assert all(m.sum() >= 5 for m in regions.values())
    # the two contrasts have different scanner gains: compare T1ce / T1 ratios against white matter's
    ratio = {k: t1ce[m].mean() / t1[m].mean() for k, m in regions.items()}
    base = ratio["wm"]
    assert ratio["enhancing"] / base > 1.6
    for k in ("necrosis", "oedema", "gm", "csf"):
        assert 0.85 < ratio[k] / base < 1.15, (k, ratio[k] / base)
    # enhancing voxels are the brightest T1ce voxels but not the brightest T1 voxels
    assert np.median(t1ce[regions["enhancing"]]) > np.percentile(t1ce[res["brain"]], 95)
    assert np.median(t1[regions["enhancing"]]) < np.percentile(t1[res["brain"]], 50)


def test_brain_tumour_shapes_are_irregular_and_nested():
    res = _tumour_case("auto")
    seg = res["seg"]
    core = (seg == 1) | (seg == 4)
    # the core is not a ball: compare its volume with the ball of the same extent (max radius)
    idx = np.argwhere(core)
    centre = idx.mean(0)
    r_max = np.sqrt(((idx - centre) ** 2).sum(1)).max()
    assert core.sum() < 0.8 * (4 / 3) * np.pi * r_max**3
    # necrosis sits inside the core: each necrotic voxel's centroid distance is below the core's extent
    nec = np.argwhere(seg == 1)
    assert np.sqrt(((nec - centre) ** 2).sum(1)).max() < r_max
    # oedema surrounds the core: its mean distance from the core centre is larger
    oed = np.argwhere(seg == 2)
    assert np.sqrt(((oed - centre) ** 2).sum(1)).mean() > np.sqrt(((idx - centre) ** 2).sum(1)).mean()


def test_brain_fallback_anatomy_paths(monkeypatch):
    assert demo_brain.resolve_anatomy("procedural") == "procedural"
    with pytest.raises(UsageError, match="anatomy"):
        demo_brain.resolve_anatomy("mri")
    monkeypatch.setattr(demo_brain, "nilearn_template_dir", lambda: None)
    assert demo_brain.resolve_anatomy("auto") == "procedural"
    with pytest.raises(UsageError, match="nilearn"):
        demo_brain.load_atlas("template")
    res = demo_brain.brain_case(case_rng("brain", 0, 0), TINY, tumour=False, anatomy="auto")
    assert res["params"]["anatomy"] == "procedural" and not res["seg"].any()


def test_nilearn_maps_found_without_importing_nilearn():
    import subprocess
    import sys

    code = (
        "import sys; from medcfx.demo.brain import nilearn_template_dir as f; d = f(); "
        "print(d is not None, 'nilearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    try:
        import importlib.util

        has = importlib.util.find_spec("nilearn") is not None
    except ImportError:
        has = False
    assert out == [str(has), "False"]


def _dice_bruteforce(values: np.ndarray, truth: np.ndarray, n_thr: int = 200) -> float:
    """Best Dice over a grid of thresholds at the value quantiles (an independent, slower computation)."""
    thr = np.unique(np.quantile(values, np.linspace(0.5, 1.0, n_thr)))
    best = 0.0
    p = truth.sum()
    for t in thr:
        pred = values >= t
        best = max(best, 2.0 * np.logical_and(pred, truth).sum() / (pred.sum() + p))
    return best


def test_flair_threshold_does_not_separate_lesions():
    vals, truth, per_case = [], [], []
    for i in range(4):
        res = demo_brain.brain_case(case_rng("brain", 0, i), SMALL, tumour=True)
        b = res["brain"]
        f = res["images"]["flair"][b].astype(np.float64)
        y = res["seg"][b] > 0
        per_case.append(_dice_bruteforce(f, y))
        exact = demo_brain.best_threshold_dice(f, y)[0]
        assert per_case[-1] <= exact + 1e-9 and exact - per_case[-1] < 0.03
        vals.append(f / np.median(f))
        truth.append(y)
    pooled = _dice_bruteforce(np.concatenate(vals), np.concatenate(truth))
    assert 0.2 < pooled < 0.9
    assert 0.2 < np.mean(per_case) < 0.9


def test_best_threshold_dice_small_cases():
    v = np.array([0.1, 0.9, 0.8, 0.2, 0.8])
    y = np.array([0, 1, 1, 0, 0], dtype=bool)
    # thresholds: >=0.9 -> 2*1/(1+2)=0.667; >=0.8 -> 2*2/(3+2)=0.8; >=0.2 -> 2*2/(4+2)=0.667
    d, t = demo_brain.best_threshold_dice(v, y)
    assert d == pytest.approx(0.8) and t == pytest.approx(0.8)
    assert math.isnan(demo_brain.best_threshold_dice(v, np.zeros(5, bool))[0])


# ======================================================================================= vertebra


@pytest.fixture(scope="module")
def vert_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "vert"
    make_demo("vertebra", out, cases=24, seed=5, grade_probs=(0.25, 0.25, 0.25, 0.25), graded_fraction=0.5)
    return out


def test_vertebra_layout_and_labels(vert_set):
    header, rows = _csv(vert_set / "labels.csv")
    assert header == ["file", "fracture", "grade"]
    assert len(rows) == 24
    graded = [r for r in rows if r["grade"] != ""]
    assert all(rows[i]["grade"] != "" for i in range(8))  # the first few are always graded
    assert 12 <= len(graded) <= 12 + 8  # round(0.5 * 24) random ones plus the first 8
    for r in rows:
        assert r["fracture"] in ("0", "1")
        if r["grade"]:
            assert int(r["grade"]) in (0, 1, 2, 3)
            assert int(r["fracture"]) == int(int(r["grade"]) >= 1)
        im = Image.open(vert_set / r["file"])
        assert im.size == (96, 96) and im.mode.startswith("I")
        a = np.asarray(im).astype(np.int64)
        assert a.min() >= 0 and a.max() <= 4095
        hu = a - 1024
        assert hu.max() > 400 and np.median(hu) < 150  # cortical bone present; mostly soft tissue
    assert len({r["grade"] for r in graded}) >= 3


def test_vertebra_default_grade_imbalance(tmp_path):
    out = make_demo("vertebra", tmp_path / "v", cases=60, seed=0, size=32, graded_fraction=1.0)
    _, rows = _csv(out / "labels.csv")
    grades = np.array([int(r["grade"]) for r in rows])
    assert (grades == 0).mean() > 0.6  # most are normal (default 80 % G0)
    assert len(rows) == 60 and all(r["grade"] != "" for r in rows)


def _bilinear(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    r0 = np.clip(np.floor(rows).astype(int), 0, img.shape[0] - 2)
    c0 = np.clip(np.floor(cols).astype(int), 0, img.shape[1] - 2)
    fr, fc = rows - r0, cols - c0
    return ((1 - fr) * (1 - fc) * img[r0, c0] + (1 - fr) * fc * img[r0, c0 + 1]
            + fr * (1 - fc) * img[r0 + 1, c0] + fr * fc * img[r0 + 1, c0 + 1])


def _measure_heights(hu: np.ndarray, p: dict) -> list[float]:
    """Heights (mm) of the centre body at t = 0.1, 0.5, 0.9, measured on the image: walk from the body's
    centre along the column axis (profile averaged over 3 parallel lines and a 1 mm window) to the first
    point where it stays below 130 HU (between disc / soft tissue and trabecular bone) for 2 mm, then back
    to the half-maximum edge of the cortical endplate."""
    th = math.radians(p["axis_deg"])
    mm = p["mm_per_px"]
    W = p["width_mm"]
    step = 0.1
    box = np.ones(10) / 10
    out = []
    for t in (0.1, 0.5, 0.9):
        a = -W / 2 + t * W
        ends = []
        for direction in (-1, 1):
            ys = direction * np.arange(0, 30, step)
            du = math.cos(th) * a - math.sin(th) * ys
            dv = math.sin(th) * a + math.cos(th) * ys
            prof = np.mean([_bilinear(hu, p["centre_px"][1] + dv / mm + o * math.sin(th),
                                      p["centre_px"][0] + du / mm + o * math.cos(th)) for o in (-0.5, 0, 0.5)], 0)
            prof = np.convolve(prof, box, mode="same")
            run = np.convolve((prof < 130).astype(float), np.ones(20), mode="full")[19:]  # run[i]: i..i+19
            first = np.nonzero(run[: len(prof) - 20] >= 20)[0]
            assert first.size, "no end of the body found"
            i = first[0]
            # refine to the half-maximum between the endplate's cortical peak (within 3 mm inside) and
            # the level outside
            assert i > 0, "the walk starts outside the body"
            j0 = max(0, i - 30)
            k = j0 + int(np.argmax(prof[j0:i]))
            half = (prof[k] + np.median(prof[i : i + 20])) / 2
            ends.append(ys[k + int(np.nonzero(prof[k : i + 1] < half)[0][0])])
        out.append(ends[1] - ends[0])
    return out


def test_vertebra_grade_matches_measured_height_loss(vert_set):
    _, rows = _csv(vert_set / "labels.csv")
    by_grade: dict[int, list[float]] = {}
    for i, r in enumerate(rows):
        if not r["grade"]:
            continue
        g = int(r["grade"])
        img, p = demo_vertebra.vertebra_image(case_rng("vertebra", 5, i), g, 96)
        on_disk = np.asarray(Image.open(vert_set / r["file"])).astype(np.uint16)
        np.testing.assert_array_equal(img, on_disk)  # the returned parameters describe this very image
        # the label follows Genant's thresholds on the (true) relative height loss
        loss = p["height_loss"]
        assert g == (0 if loss < 0.2 else 1 if loss < 0.25 else 2 if loss <= 0.4 else 3)
        measured = np.array(_measure_heights(on_disk.astype(float) - 1024, p))
        want = np.array([p["heights_mm"][k] for k in ("anterior", "middle", "posterior")])
        ref = np.array([p["reference_heights_mm"][k] for k in ("anterior", "middle", "posterior")])
        assert np.abs(measured - want).max() < 1.6, (measured, want)  # ~2 pixels
        m_loss = 1 - (measured / ref).min()
        assert abs(m_loss - loss) < 0.07
        by_grade.setdefault(g, []).append(m_loss)
    means = [np.mean(by_grade[g]) for g in sorted(by_grade)]
    assert len(means) >= 3 and all(np.diff(means) > 0)


@pytest.mark.parametrize("shape", demo_vertebra.DEFORMITIES)
def test_vertebra_deformity_shapes(shape):
    img, p = demo_vertebra.vertebra_image(np.random.default_rng(1), 3, 96, deformity=shape, tilt_deg=0.0)
    h = dict(zip(("anterior", "middle", "posterior"), _measure_heights(img.astype(float) - 1024, p)))
    ref = p["reference_heights_mm"]
    rel = {k: h[k] / ref[k] for k in h}
    if shape == "wedge":  # anterior collapse, posterior intact
        assert rel["anterior"] < 0.62 and rel["posterior"] > 0.9
    elif shape == "biconcave":  # middle collapse, walls intact
        assert rel["middle"] < 0.62 and rel["anterior"] > 0.85 and rel["posterior"] > 0.85
    else:  # crush: all heights down by a similar amount
        assert max(rel.values()) < 0.62 and max(rel.values()) - min(rel.values()) < 0.12


def test_vertebra_deterministic(tmp_path):
    a = make_demo("vertebra", tmp_path / "a", cases=3, seed=9, size=48)
    b = make_demo("vertebra", tmp_path / "b", cases=3, seed=9, size=48)
    c = make_demo("vertebra", tmp_path / "c", cases=3, seed=10, size=48)
    for i in range(3):
        f = f"images/vert_{i:05d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f)))
        assert not np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(c / f)))
    assert (a / "labels.csv").read_bytes() == (b / "labels.csv").read_bytes()


# ======================================================================================= chest


@pytest.fixture(scope="module")
def chest_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "cxr"
    make_demo("chest", out, cases=24, seed=2, prevalence=(0.5, 0.5, 0.5), unlabelled_fraction=0.25)
    return out


CHEST_HEADER = [
    "file", "cardiomegaly", "effusion", "nodule", "bbox_cardiomegaly", "bbox_effusion", "bbox_nodule", "meta_ctr",
]


def test_chest_layout_and_unlabelled_fraction(chest_set):
    header, rows = _csv(chest_set / "labels.csv")
    assert header == CHEST_HEADER and len(rows) == 24
    empty = [r for r in rows if r["cardiomegaly"] == ""]
    assert len(empty) == 6  # round(0.25 * 24)
    for r in empty:
        assert all(r[c] == "" for c in CHEST_HEADER[1:])
    for r in rows:
        im = Image.open(chest_set / r["file"])
        assert im.mode == "L" and im.size == (128, 128)
        a = np.asarray(im)
        assert a.min() < 40 and a.max() > 180  # dark outside the body / lungs, bright mediastinum
    labelled = [r for r in rows if r["cardiomegaly"] != ""]
    for f in ("cardiomegaly", "effusion", "nodule"):
        vals = {r[f] for r in labelled}
        assert vals <= {"0", "1"} and len(vals) == 2


def test_chest_ctr_iff_cardiomegaly_and_boxes_cover_findings(chest_set):
    _, rows = _csv(chest_set / "labels.csv")
    for i, r in enumerate(rows):
        if r["cardiomegaly"] == "":
            continue
        ctr = float(r["meta_ctr"])
        assert (ctr > 0.5) == (r["cardiomegaly"] == "1")
        assert ctr > 0.51 or ctr < 0.49  # away from the decision boundary
        flags = [r[f] == "1" for f in ("cardiomegaly", "effusion", "nodule")]
        img, info = demo_chest.chest_image(case_rng("chest", 2, i), *flags, size=128)
        np.testing.assert_array_equal(img, np.asarray(Image.open(chest_set / r["file"])))
        masks = info["masks"]
        # CTR recomputed from the masks: widest horizontal span of the heart / of the thorax
        def widest(m):
            spans = [np.ptp(np.nonzero(row)[0]) + 1 for row in m if row.any()]
            return max(spans)
        assert widest(masks["heart"]) / widest(masks["thorax"]) == pytest.approx(ctr, abs=6e-5)
        for f, mask_name in (("cardiomegaly", "heart"), ("effusion", "effusion"), ("nodule", "nodule")):
            cell = r[f"bbox_{f}"]
            if r[f] == "0":
                assert cell == ""
                continue
            x0, y0, x1, y1 = (int(v) for v in cell.split(";"))
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            m = masks[mask_name]
            ys, xs = np.nonzero(m)
            assert ys.size > 0
            # the box covers every finding pixel and is tight (each side touches the finding)
            assert xs.min() == x0 and xs.max() == x1 - 1 and ys.min() == y0 and ys.max() == y1 - 1
        if r["nodule"] == "1":
            # the nodule is an opacity: brighter than its ring of surrounding lung
            nm = masks["nodule"]
            ys, xs = np.nonzero(nm)
            ring = np.zeros_like(nm)
            ring[max(ys.min() - 3, 0): ys.max() + 4, max(xs.min() - 3, 0): xs.max() + 4] = True
            ring &= ~nm & masks["lungs"]
            if ring.sum() > 10:
                assert img[nm].mean() > img[ring].mean()
        if r["effusion"] == "1":
            # the fluid is denser (brighter) than the aerated lung above it
            em = masks["effusion"]
            air = masks["lungs"] & ~em
            assert img[em].mean() > img[air].mean() + 10


def test_chest_prevalence_extremes_and_determinism(tmp_path):
    allp = make_demo("chest", tmp_path / "all", cases=6, seed=0, size=64, prevalence=(1, 1, 1))
    nonep = make_demo("chest", tmp_path / "none", cases=6, seed=0, size=64, prevalence=(0, 0, 0))
    _, r1 = _csv(allp / "labels.csv")
    _, r0 = _csv(nonep / "labels.csv")
    assert all(r[f] == "1" and r[f"bbox_{f}"] for r in r1 for f in ("cardiomegaly", "effusion", "nodule"))
    assert all(r[f] == "0" and not r[f"bbox_{f}"] for r in r0 for f in ("cardiomegaly", "effusion", "nodule"))
    assert all(float(r["meta_ctr"]) > 0.5 for r in r1) and all(float(r["meta_ctr"]) < 0.5 for r in r0)
    again = make_demo("chest", tmp_path / "again", cases=6, seed=0, size=64, prevalence=(1, 1, 1))
    assert (again / "labels.csv").read_bytes() == (allp / "labels.csv").read_bytes()
    for i in range(6):
        f = f"images/cxr_{i:05d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(allp / f)), np.asarray(Image.open(again / f)))
    other = make_demo("chest", tmp_path / "other", cases=1, seed=1, size=64, prevalence=(1, 1, 1))
    assert not np.array_equal(np.asarray(Image.open(other / "images/cxr_00000.png")),
                              np.asarray(Image.open(allp / "images/cxr_00000.png")))


def test_chest_default_prevalences_roughly(tmp_path):
    out = make_demo("chest", tmp_path / "d", cases=80, seed=4, size=64)
    _, rows = _csv(out / "labels.csv")
    for f, p in zip(("cardiomegaly", "effusion", "nodule"), demo_chest.DEFAULT_PREVALENCE):
        rate = np.mean([r[f] == "1" for r in rows])
        assert abs(rate - p) < 0.15, (f, rate)
