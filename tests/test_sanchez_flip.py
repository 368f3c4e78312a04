"""The flip rate of the classifier-guided baseline (cdpm-classifier): P(healthy) at t = 0 before and after,
recorded per slice, counted and pooled as the docs say, in explain's provenance and in evaluate's report."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import cli_env, run_cli
from test_sanchez import TINY as SANCHEZ_TINY
from medcfx.demo import make_demo
from medcfx_sanchez.flip import FlipRecorder
from medcfx_sanchez.networks import NoisyClassifier


class MeanClassifier(torch.nn.Module):
    """logits (m, -m) with m the image mean: P(healthy) = 1 / (1 + exp(-2 m)) in closed form."""

    def forward(self, x, t):
        assert (t == 0).all()  # judged without noise
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)


def _p(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-2.0 * x.reshape(len(x), -1).mean(1).astype(np.float64)))


def test_recorder_probabilities_flips_and_off_target_change_match_brute_force():
    rng = np.random.default_rng(0)
    # slice means chosen across 0 so that every kind of slice occurs: counted + flipped, counted + not,
    # already healthy (not counted)
    means_x = np.array([-0.4, -0.3, 0.2, -0.1, 0.5])
    means_cf = np.array([0.3, -0.2, -0.4, 0.05, 0.6])
    x = (rng.normal(0, 0.05, (5, 2, 6, 6)) + means_x[:, None, None, None]).astype(np.float32)
    x_cf = (rng.normal(0, 0.05, (5, 2, 6, 6)) + means_cf[:, None, None, None]).astype(np.float32)
    rec = FlipRecorder(MeanClassifier())
    for lo, hi in ((0, 2), (2, 5)):  # two batches, in slice order
        rec.add(torch.from_numpy(x[lo:hi]), torch.from_numpy(x_cf[lo:hi]))
    heat = rng.random((5, 6, 6))
    lesion = np.zeros((5, 6, 6), bool)
    lesion[1:3, 2:4, 2:4] = True
    region = np.ones((5, 6, 6), bool)
    region[:, 0] = False
    r = rec.take(5, heat, lesion, region)

    before, after = _p(x), _p(x_cf)
    np.testing.assert_allclose(r["p_target_before"], before, rtol=1e-6)
    np.testing.assert_allclose(r["p_target_after"], after, rtol=1e-6)
    counted = [i for i in range(5) if before[i] < 0.5]
    flipped = [i for i in counted if after[i] >= 0.5]
    assert (r["counted"], r["flipped"]) == (len(counted), len(flipped)) == (3, 2)
    assert r["flip_rate"] == pytest.approx(2 / 3)
    assert r["off_target_image_change"] == pytest.approx(heat[region & ~lesion].mean())
    assert r["lesion_image_change"] == pytest.approx(heat[region & lesion].mean())
    # the recorder starts over: a second case with no lesion mask has no off-target figure
    rec.add(torch.from_numpy(x[:1]), torch.from_numpy(x[:1]))
    r2 = rec.take(1, heat[:1], None, None)
    assert r2["counted"] == 1 and r2["flipped"] == 0 and r2["off_target_image_change"] is None

    s = FlipRecorder.summary([r, r2])
    assert (s["slices"], s["counted"], s["flipped"]) == (6, 4, 2) and s["flip_rate"] == pytest.approx(0.5)
    assert s["p_target_before_mean"] == pytest.approx(np.r_[before, before[:1]].mean())
    assert s["off_target_image_change_mean"] == pytest.approx(r["off_target_image_change"])  # cases that have it


def test_recorder_refuses_a_record_of_other_slices_and_a_healthy_case_is_all_off_target():
    rec = FlipRecorder(MeanClassifier())
    rec.add(torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    with pytest.raises(RuntimeError, match="holds 3 slices, the case has 2"):
        rec.take(2)
    rec.add(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    rec.reset()  # a case that failed half-way leaves nothing behind
    rec.add(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    heat = np.arange(32, dtype=float).reshape(2, 4, 4)
    r = rec.take(2, heat, np.zeros((2, 4, 4), bool), None)
    assert r["flip_rate"] is None  # p = 0.5 is already healthy
    # a case without lesion: every change is off-target; nothing inside
    assert r["off_target_image_change"] == pytest.approx(heat.mean()) and r["lesion_image_change"] is None


TINY = {**SANCHEZ_TINY, "val_slices": 0}  # the sanchez tests' tiny networks, no validation explain


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny cdpm-classifier trained through the CLI, and a small annotated brain set."""
    root = tmp_path_factory.mktemp("flip")
    make_demo("brain", root / "brain", cases=3, seed=0, shape=(32, 32, 12), tumour_free_fraction=0.0)
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    env = cli_env(root / "home")
    proc = run_cli(["train", "cdpm-classifier", "--data", root / "brain", "-c", cfg, "--device", "cpu",
                    "--runs-dir", root / "runs", "--name", "tiny-clf"], env=env, check=0)
    return root, env, json.loads(proc.stdout[proc.stdout.index("{"):])["model"]


def test_explain_and_evaluate_report_the_classifier_flip(trained, tmp_path):
    from medcfx.data.preprocess import PreprocessConfig
    from medcfx.inputs import iter_cases

    root, env, model = trained
    case_dir = root / "brain" / "demo_00001"
    res = run_cli(["explain", case_dir, "--model", model, "--out", tmp_path / "ex", "--self-check-slices", "0"],
                  env=env, check=0)
    summary = json.loads(res.stdout)["cases"][0]
    flip = json.loads((tmp_path / "ex" / "demo_00001" / "provenance.json").read_text())["flip"]

    # P(healthy | x, t = 0) of the input slices, recomputed from the registry's classifier file
    entry = json.loads(run_cli(["models", "show", model, "--json"], env=env, check=0).stdout)
    clf = NoisyClassifier(entry["config"]["classifier"])
    clf.load_state_dict(load_file(entry["artifacts"]["classifier"]["file"]))
    clf.eval()
    case = next(c for c in iter_cases(case_dir, PreprocessConfig.from_dict(entry["config"]["preprocess"]), 4))
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(case.images))
        want = torch.softmax(clf(x, torch.zeros(len(x), dtype=torch.long)), dim=1)[:, 0].double().numpy()
    np.testing.assert_allclose(flip["p_target_before"], want, atol=1e-5)
    before, after = np.asarray(flip["p_target_before"]), np.asarray(flip["p_target_after"])
    assert len(after) == summary["slices"] == len(case.slice_index) and ((after >= 0) & (after <= 1)).all()
    counted = before < 0.5
    assert flip["counted"] == counted.sum() and flip["flipped"] == (counted & (after >= 0.5)).sum()
    assert summary["p_target_before"] == pytest.approx(before.mean())
    row = next(csv.DictReader(open(tmp_path / "ex" / "summary.csv")))  # the batch summary carries it too
    assert float(row["p_target_before"]) == pytest.approx(before.mean())
    if flip["flip_rate"] is None:
        assert row["flip_rate"] == ""
    else:
        assert float(row["flip_rate"]) == pytest.approx(flip["flip_rate"])
    # the case has its _seg file: the off-target change is the heatmap's mean outside the lesion
    assert flip["off_target_image_change"] is not None and flip["lesion_image_change"] is not None

    # evaluate (with --val: its calibration pass must not leave its slices in the record) pools the cases
    run_cli(["evaluate", "cdpm-classifier", "--model", model, "--data", root / "brain", "--val", root / "brain",
             "--out", tmp_path / "ev", "--n-resamples", "0", "--self-check-slices", "0"], env=env, check=0)
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    f = report["flip"]
    assert f["cases"] == len(report["per_case"]) == 3 and f["slices"] == report["slices"]
    rows = {r["case"]: r for r in report["per_case"]}
    assert rows["demo_00001"]["p_target_before"] == pytest.approx(before.mean(), abs=1e-6)  # deterministic
    if f["counted"]:
        assert f["flip_rate"] == pytest.approx(f["flipped"] / f["counted"])
    else:
        assert f["flip_rate"] is None
    means = [rows[c]["off_target_image_change"] for c in rows]
    assert f["off_target_image_change_mean"] == pytest.approx(np.mean(means))
    assert not any(isinstance(v, float) and math.isnan(v) for v in f.values())
