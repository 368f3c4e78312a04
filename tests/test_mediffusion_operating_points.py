"""mediffusion's operating points: ``medcfx calibrate`` on the difference maps of one target (boxes as
lesions) and ``explain`` thresholding at the stored threshold (mask.png, components, area, decision). The
expected values are recomputed here: the maps in-process with the same seed, the quantile by numpy, the
components by scipy.ndimage.label."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from conftest import run_cli
from medcfx.registry import Registry
from test_mediffusion_cli import _env, data, models  # noqa: F401  (fixtures)

STEPS = "3"


def _maps(home, pp, paths):
    """The no-cardiomegaly difference maps of ``paths`` on their own grids, as explain makes them (t 300,
    scale 500, 3 DDPM steps, seed 0), computed here in-process; under NAME + ":model" the same at the
    model's size (the panel's)."""
    from medcfx.data import PreprocessConfig
    from medcfx.diffusion import Schedule
    from medcfx_mediffusion import counterfactual as cf
    from medcfx_mediffusion.data import load_joint, read_input
    from medcfx_mediffusion.sampling import run_counterfactual

    model, codec, entry = load_joint(Registry(home, bundled=False), "mediffusion:1")
    schedule = Schedule.create("linear", 1000)
    targets = cf.parse_targets(["no-cardiomegaly"], entry.config["classifier"]["findings"])
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI subprocesses (OMP_NUM_THREADS=1)
    try:
        for p in paths:
            x, geom = read_input(p, PreprocessConfig.from_dict(pp), 1)
            x_cf = run_counterfactual(model, codec, schedule, x, "bce", targets, [500.0], 300, STEPS, "ddpm", 0,
                                      self_check=False)[0]
            u = lambda a: ((a.clamp(-1, 1) + 1) / 2).numpy()  # noqa: E731
            model_size = np.abs(u(x_cf[0]) - u(x[0])).mean(0)
            out[p.name] = geom.to_original(model_size[None]).astype(np.float32)
            out[p.name + ":model"] = model_size.astype(np.float32)
    finally:
        torch.set_num_threads(threads)
    return out


def test_calibrate_stores_the_healthy_quantile_and_explain_thresholds_at_it(home, models, data, tmp_path):  # noqa: F811
    # img_02 is positive for cardiomegaly but loses its box: skipped (and said)
    rows = list(csv.reader(open(data / "labels.csv")))
    rows[3][3] = ""
    with open(data / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    env = _env(home)
    p = run_cli(["calibrate", "mediffusion:1", "--data", data, "--target", "no-cardiomegaly", "--steps", STEPS,
                 "--cf-images", "6", "--fpr", "0.1"], env=env, check=0)
    said = " ".join((p.stdout + p.stderr).split())  # the log, unwrapped
    assert "skipped 1 positive without a box" in said
    entry = Registry(home, bundled=False).resolve("mediffusion:2")
    cal, settings = entry.extra["calibration"], entry.extra["calibration_settings"]
    assert entry.parent == "mediffusion:1"
    assert settings["targets"] == ["no-cardiomegaly"] and settings["images"] == 6
    assert settings["skipped_positive_without_box"] == 1 and settings["positive_images"] == 3
    # the first 6 usable rows: 0 (box), 1, 3, 4 (box), 5, 6 (box); 2 skipped
    used = [0, 1, 3, 4, 5, 6]
    maps = _maps(home, models["pp"], [data / "images" / f"img_{i:02d}.png" for i in used])
    healthy = []
    for i in used:
        m = maps[f"img_{i:02d}.png"]
        assert m.shape == (24, 24)
        keep = np.ones(m.shape, bool)
        if i % 2 == 0:
            keep[6:18, 6:18] = False  # box 6;6;18;18 in the input's pixels
        healthy.append(m[keep])
    healthy = np.concatenate(healthy)
    t_exact = float(np.quantile(healthy, 0.9, method="inverted_cdf"))
    t = cal["threshold_fpr"]
    assert t_exact <= t <= t_exact * (1 + 2 ** -12)
    assert cal["n_healthy_pixels"] == healthy.size and cal["n_pixels"] == 6 * 24 * 24
    assert cal["achieved_fpr"] <= 0.1 and cal["threshold_best_dice"] is not None

    # explain with the calibrated model: mask.png = difference > t, components with 8 neighbours
    out = tmp_path / "out"
    pngs = [data / "images" / "img_00.png", data / "images" / "img_07.png"]
    p = run_cli(["explain", *pngs, "--model", "mediffusion:2", "--method", "mediffusion", "--target",
                 "no-cardiomegaly", "--steps", STEPS, "--self-check=false", "--out", out], env=env, check=0)
    expect = _maps(home, models["pp"], pngs)
    flagged = 0
    for png in pngs:
        folder = out / png.stem
        mask = np.asarray(Image.open(folder / "mask.png")) > 0
        diff = expect[png.name]
        np.testing.assert_array_equal(mask, diff > np.float32(t))
        # panel.png (model-sized tiles, 3 x 3 pixels each) outlines the thresholded map in pure green: the
        # boundary pixels (4-neighbour) of diff > t at the model's size, in the last tile
        small = expect[png.name + ":model"] > np.float32(t)
        edge = small & ~ndimage.binary_erosion(small, structure=ndimage.generate_binary_structure(2, 1))
        panel = np.asarray(Image.open(folder / "panel.png").convert("RGB"))
        s = 3 * small.shape[0]
        last = panel[:, panel.shape[1] - 4 - s:panel.shape[1] - 4]
        green = (last == [0, 255, 0]).all(axis=2)
        top = int(np.argmax(green.any(axis=1))) - 3 * int(np.argmax(edge.any(axis=1)))
        np.testing.assert_array_equal(green[top:top + s:3, ::3], edge)
        flagged += int(mask.sum())
        _, n = ndimage.label(mask, structure=np.ones((3, 3)))
        prov = json.loads((folder / "provenance.json").read_text())
        d = prov["decision"]
        assert d["operating_point"] == "fpr10" and d["threshold"] == t
        assert d["n_components"] == n and d["lesion_size_pixels"] == mask.sum()
        assert d["decision"] == ("lesion present" if n else "no lesion")
        np.testing.assert_allclose(d["image_score"], diff.max(), rtol=1e-6)
        assert prov["operating_point"]["name"] == "fpr10" and "warning" not in prov
    assert flagged > 0  # the comparison is not between two empty masks
    assert "calibration:" not in p.stdout + p.stderr

    # another target than the calibrated one: a warning, no mask
    p = run_cli(["explain", pngs[0], "--model", "mediffusion:2", "--method", "mediffusion", "--target", "no-effusion",
                 "--steps", STEPS, "--self-check=false", "--out", tmp_path / "other"], env=env, check=0)
    prov = json.loads((tmp_path / "other" / "img_00" / "provenance.json").read_text())
    assert "made for target no-cardiomegaly" in prov["warning"] and "not no-effusion" in prov["calibration"] and prov["decision"] is None
    assert not (tmp_path / "other" / "img_00" / "mask.png").exists() and "warning:" in p.stdout + p.stderr
    # other settings for the same target: the mask, with a warning; no calibration: said once
    p = run_cli(["explain", pngs[0], "--model", "mediffusion:2", "--method", "mediffusion", "--target",
                 "no-cardiomegaly", "--steps", "2", "--self-check=false", "--out", tmp_path / "steps"], env=env, check=0)
    prov = json.loads((tmp_path / "steps" / "img_00" / "provenance.json").read_text())
    assert "steps '2' (calibrated at '3')" in prov["warning"] and (tmp_path / "steps" / "img_00" / "mask.png").exists()
    p = run_cli(["explain", pngs[0], "--model", "mediffusion:1", "--method", "mediffusion", "--target",
                 "no-cardiomegaly", "--steps", STEPS, "--self-check=false", "--out", tmp_path / "none"], env=env, check=0)
    prov = json.loads((tmp_path / "none" / "img_00" / "provenance.json").read_text())
    assert prov["calibration"].startswith("none:") and prov["decision"] is None
    assert (p.stdout + p.stderr).count("calibration: none:") == 1


def test_evaluate_localises_at_the_calibrated_thresholds(home, models, data, tmp_path):  # noqa: F811
    """evaluate --localise-images: the calibrated target's difference maps of the test images, scored against
    the boxes on each image's own grid, checked against scikit-learn (AP, AUROC) and brute force (Dice at
    the stored threshold, per-image Dice, image AUROC from the largest difference)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    env = _env(home)
    out = tmp_path / "ev"
    # no calibration yet: refused before any work, nothing written
    p = run_cli(["evaluate", "mediffusion", "--model", "mediffusion:1", "--data", data, "--localise-images", "4",
                 "--out", out], env=env)
    assert p.returncode == 2 and "has no calibration" in p.stderr and p.stderr.count("\n") == 1
    assert not out.exists()
    run_cli(["calibrate", "mediffusion:1", "--data", data, "--target", "no-cardiomegaly", "--steps", STEPS,
             "--cf-images", "4"], env=env, check=0)
    t = Registry(home, bundled=False).resolve("mediffusion:2").extra["calibration"]["threshold_fpr"]
    run_cli(["evaluate", "mediffusion", "--model", "mediffusion:2", "--data", data, "--localise-images", "5",
             "--cf-images", "0", "--n-resamples", "50", "--out", out], env=env, check=0)
    rep = json.loads((out / "localisation" / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["localisation"]["folder"] == str(out / "localisation")

    names = [f"img_{i:02d}.png" for i in range(5)]  # the first 5 labelled rows (rows 0, 2, 4 have a box)
    maps = _maps(home, models["pp"], [data / "images" / n for n in names])
    scores, labels, dice_case, img_scores, img_labels = [], [], [], [], []
    tp = fp = fn = 0
    for i, n in enumerate(names):
        m = maps[n]
        lesion = np.zeros(m.shape, bool)
        if i % 2 == 0:
            lesion[6:18, 6:18] = True
        scores.append(m.ravel())
        labels.append(lesion.ravel())
        pred = m > np.float32(t)
        a, b, c = (pred & lesion).sum(), (pred & ~lesion).sum(), (~pred & lesion).sum()
        tp, fp, fn = tp + a, fp + b, fn + c
        dice_case.append(2 * a / (2 * a + b + c) if lesion.any() else float(not pred.any()))
        img_scores.append(m.max())
        img_labels.append(i % 2 == 0)
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    got = rep["metrics"]
    assert rep["counts"]["cases"] == 5 and rep["counts"]["pixels"] == len(scores)
    assert abs(got["pixel_AUPRC"] - average_precision_score(labels, scores)) < 2e-3
    assert abs(got["pixel_AUROC"] - roc_auc_score(labels, scores)) < 2e-3
    assert got["pixel_Dice@fpr5"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-9)
    assert got["volume_Dice_mean@fpr5"] == pytest.approx(np.mean(dice_case), abs=1e-9)
    assert got["image_AUROC"] == pytest.approx(roc_auc_score(img_labels, img_scores))
    assert rep["targets"] == ["no-cardiomegaly"] and rep["steps"] == STEPS and rep["positive_images"] == 3


def test_localisation_refuses_additions_and_a_set_without_a_positive_box(home, models, data, tmp_path):  # noqa: F811
    env = _env(home)
    p = run_cli(["calibrate", "mediffusion:1", "--data", data, "--target", "cardiomegaly", "--steps", STEPS], env=env)
    assert p.returncode == 2 and "only removal targets" in p.stderr and p.stderr.count("\n") == 1
    run_cli(["calibrate", "mediffusion:1", "--data", data, "--target", "no-cardiomegaly", "--steps", STEPS,
             "--cf-images", "4"], env=env, check=0)
    rows = list(csv.reader(open(data / "labels.csv")))
    for r in rows[1:]:
        r[3] = ""  # no box: every positive image is skipped, only negatives are left
    with open(data / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    p = run_cli(["evaluate", "mediffusion", "--model", "mediffusion:2", "--data", data, "--localise-images", "4",
                 "--cf-images", "0", "--out", tmp_path / "ev"], env=env)
    assert p.returncode != 0 and "pixel AP and Dice are undefined" in p.stderr
    assert not (tmp_path / "ev").exists()
