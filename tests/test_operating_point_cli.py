"""Operating points through the real CLI: `calibrate` stores thresholds with a model, `explain` turns the
heatmap into mask.nii.gz / components / a volume in ml / a decision, `evaluate` reports Dice at each
threshold; each figure checked against an independent computation (numpy quantile, scipy.ndimage, nibabel,
brute-force Dice)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import ROOT, demo_brains, run_cli
from medcfx.data.preprocess import PreprocessConfig
from medcfx.inputs import iter_cases

DEMO_CASE = ROOT / "models" / "demo-inputs" / "brain" / "demo_case"
FAST = ["--steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("op")
    home, env = demo_brains(root, {"val": (2, 3), "test": (2, 4)})
    return {"root": root, "home": home, "env": env}


def _flair_voxels(data, size=16):
    """The threshold baseline's map (normalised FLAIR) on each input's grid, its foreground and lesion."""
    out = []
    for case in iter_cases(data, PreprocessConfig(size=size), 4):
        heat = case.to_original((case.images[:, 3] + 1) / 2)
        seg = np.asarray(nib.load(str(next((data / case.id).glob("*_seg.nii.gz")))).dataobj) > 0
        out.append((heat, case.result.foreground, seg))
    return out


def test_evaluate_with_val_calibrates_then_scores_dice_at_each_threshold(sets):
    root, env = sets["root"], sets["env"]
    # the baseline's map pinned to the plain normalised FLAIR at 16 px (what _flair_voxels recomputes), so this
    # test is about calibration and scoring, not the baseline's defaults (tests/test_threshold_baseline.py)
    run_cli(["evaluate", "threshold", "--data", root / "test", "--val", root / "val", "--set", "preprocess.size=16",
             "--set", "preprocess.percentile=99", "--set", "preprocess.clip=true", "--median-filter", "1",
             "--n-resamples", "30", "--out", root / "ev"], env=env, check=0)
    report = json.loads((root / "ev" / "metrics.json").read_text())
    cal = report["calibration"]
    val = _flair_voxels(root / "val")
    healthy = np.concatenate([h[fg & ~seg] for h, fg, seg in val]).astype(np.float32)
    exact = np.quantile(healthy, 0.95, method="inverted_cdf")
    assert exact <= cal["threshold_fpr"] <= exact * (1 + 2 ** -12) + 1e-7  # within one 22-bit bin, above
    assert (healthy > np.float32(cal["threshold_fpr"])).mean() <= 0.05
    assert cal["achieved_fpr"] == pytest.approx((healthy > np.float32(cal["threshold_fpr"])).mean(), abs=1e-9)
    # Dice at each named threshold on the test voxels, brute force
    test = _flair_voxels(root / "test")
    for name, t in report["thresholds"].items():
        tp = fp = fn = 0
        per_case = []
        for heat, fg, seg in test:
            flag = (heat.astype(np.float32) > np.float32(t)) & fg
            les = seg & fg
            a, b, c = int((flag & les).sum()), int((flag & ~les).sum()), int((~flag & les).sum())
            tp, fp, fn = tp + a, fp + b, fn + c
            per_case.append(2 * a / (2 * a + b + c) if les.any() else float(not flag.any()))
        assert report["metrics"][f"pixel_Dice@{name}"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-9)
        assert report["metrics"][f"volume_Dice_mean@{name}"] == pytest.approx(np.mean(per_case), abs=1e-9)
    md = (root / "ev" / "metrics.md").read_text()
    assert "oracle" in md and "95 % bootstrap interval" in md and "## Per case" in md


def test_calibrate_then_explain_writes_mask_components_and_volume(sets):
    root, env = sets["root"], sets["env"]
    # without calibration: the heatmap only, and the summary says so
    plain = run_cli(["explain", DEMO_CASE, "--model", "sanchez-demo", "--slice", "6", "--out", root / "plain", *FAST],
                    env=env, check=0)
    assert json.loads(plain.stdout)["calibration"].startswith("none")
    assert not (root / "plain" / "demo_case" / "mask.nii.gz").exists()

    proc = run_cli(["calibrate", "sanchez-demo", "--data", root / "val", "--max-slices", "6", *FAST], env=env, check=0)
    assert "-> sanchez-demo:2" in proc.stdout.replace("\n", "")
    entry = json.loads(run_cli(["models", "show", "sanchez-demo:2", "--json"], env=env, check=0).stdout)
    cal = entry["calibration"]
    assert cal["fpr"] == 0.05 and cal["n_cases"] == 2 and cal["threshold_best_dice"] is not None
    assert entry["parent"] == "sanchez-demo:1" and entry["calibration_settings"]["steps"] == 4

    out = root / "cal"
    res = run_cli(["explain", DEMO_CASE, "--model", "sanchez-demo:2", "--slice", "6", "--min-size", "3",
                   "--out", out, *FAST], env=env, check=0)
    summary = json.loads(res.stdout)
    assert summary["operating_point"]["name"] == "fpr5"
    assert summary["operating_point"]["threshold"] == pytest.approx(cal["threshold_fpr"])
    heat_img = nib.load(str(out / "demo_case" / "heatmap.nii.gz"))
    mask_img = nib.load(str(out / "demo_case" / "mask.nii.gz"))
    flair = nib.load(str(DEMO_CASE / "demo_case_flair.nii.gz"))
    assert np.allclose(mask_img.affine, flair.affine) and mask_img.shape == flair.shape
    heat, mask = np.asarray(heat_img.dataobj), np.asarray(mask_img.dataobj) > 0
    # brute force: 26-connected components of (heat > t) on slice 6's voxels of the foreground, >= 3 voxels
    case = next(iter_cases(DEMO_CASE, PreprocessConfig.from_dict(entry["config"]["preprocess"]), 4)).select(6)
    raw = (heat > np.float32(cal["threshold_fpr"])) & case.scored_region
    labels, n = ndimage.label(raw, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= 3) + 1
    assert np.array_equal(mask, np.isin(labels, keep))
    prov = json.loads((out / "demo_case" / "provenance.json").read_text())["decision"]
    assert prov["n_components"] == len(keep) and prov["decision"] == ("lesion" if len(keep) else "no lesion")
    voxel_ml = math.prod(flair.header.get_zooms()[:3]) / 1000
    assert prov["lesion_size_ml"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-6)  # zooms stored as float32
    assert sum(prov["component_sizes_ml"]) == pytest.approx(prov["lesion_size_ml"], rel=1e-9)
    assert mask.sum() > 0  # the demo tumour is found at 5 % FPR
    # a settings mismatch is said; an operating point the model lacks is a one-line error
    other = run_cli(["explain", DEMO_CASE, "--model", "sanchez-demo:2", "--slice", "6", "--out", root / "o2",
                     "--steps", "5", "--device", "cpu"], env=env, check=0)
    assert "other sampling settings" in json.loads(other.stdout)["warning"]
    bad = run_cli(["explain", DEMO_CASE, "--model", "sanchez-demo:2", "--operating-point", "fpr1", "--out",
                   root / "o3", *FAST], env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and not (root / "o3").exists()


def test_calibrate_refuses_bad_requests_before_work(sets):
    root, env = sets["root"], sets["env"]
    for args, says in ((["--fpr", "1.5"], "--fpr"), (["--fpr", "nan"], "--fpr")):
        p = run_cli(["calibrate", "sanchez-demo", "--data", root / "val", *args], env=env)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli(["calibrate", "sanchez-demo", "--data", root / "nothere"], env=env)
    assert p.returncode == 2 and "nothere" in p.stderr


def test_inversion_self_check_is_reported_and_flags_a_poor_inversion(sets):
    """sanchez explain checks encode + unguided decode against the input: 4 DDIM steps invert the demo brain
    poorly (flagged, with a warning in the summary), and the flag is exactly max(error) > the sampler's limit
    (each sampler its own). An encoding depth of 0 steps (a heatmap of 0 everywhere, a self-check of exactly
    0: a plausible "no lesion") is refused before any output, naming the options."""
    from medcfx_sanchez.methods import SELF_CHECK_LIMITS

    root, env = sets["root"], sets["env"]
    p = run_cli(["explain", DEMO_CASE, "--model", "sanchez-demo", "--slice", "6", "--noise-level", "0.01",
                 "--out", root / "sc-id", *FAST], env=env)
    assert p.returncode == 2 and "--noise-level 0.01 x --steps 4 encodes by 0 steps" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (root / "sc-id").exists()
    res = {}
    for sampler in ("fast", "paper"):
        p = run_cli(["explain", DEMO_CASE, "--model", "sanchez-demo", "--slice", "6", "--sampler", sampler,
                     "--out", root / f"sc-{sampler}", *FAST], env=env, check=0)
        res[sampler] = (json.loads(p.stdout)["cases"][0],
                        json.loads((root / f"sc-{sampler}" / "demo_case" / "provenance.json").read_text())["self_check"])
    for sampler, (summary, check) in res.items():
        assert check["limit"] == SELF_CHECK_LIMITS[sampler] and check["slices"] == [6]
        assert check["flagged"] == (max(check["mean_abs_error"]) > check["limit"])
        assert ("warning" in summary) == check["flagged"]
    summary, check = res["paper"]
    assert check["flagged"] and summary["self_check_error"] == max(check["mean_abs_error"])
    assert "self-check failed" in summary["warning"]
    # evaluate reports it per case and summarised
    run_cli(["evaluate", "sanchez", "--model", "sanchez-demo", "--data", root / "test", "--max-slices", "2",
             "--self-check-slices", "1", "--n-resamples", "0", "--out", root / "ev-sc", *FAST], env=env, check=0)
    rep = json.loads((root / "ev-sc" / "metrics.json").read_text())
    errors = [row["self_check_error"] for row in rep["per_case"]]
    assert len(errors) == 2 and rep["self_check"]["mean_worst_error"] == pytest.approx(np.mean(errors))
    assert rep["self_check"]["flagged"] == sum(row["self_check_flagged"] for row in rep["per_case"])
