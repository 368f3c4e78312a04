"""diffae counterfactual quality (issue 16): the inversion self-check (the reconstruction the commands already
make), the flip of the binary counterfactual and the off-target change, per case in grade / explain and
aggregated by evaluate, on the bundled diffae-demo:3 and diffae-grader-demo:3. Expected values are
recomputed here: the reconstruction in-process, the flips by hand from the probabilities in the same output."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from conftest import cli_env, run_cli  # noqa: E402

from medcfx.registry import Registry  # noqa: E402
from medcfx_diffae import quality as cq  # noqa: E402

VERTEBRA = ROOT / "models" / "demo-inputs" / "vertebra.png"


def _bundled():
    reg = Registry(ROOT / "no-user-home", bundled=ROOT / "registry.yaml")
    if not VERTEBRA.exists() or "diffae-grader-demo" not in {e.name for e in reg.entries()}:
        pytest.skip("the bundled diffae demo models are not in this checkout")
    return reg


def _hand_flip(before, after, distance):
    if distance > 0:
        return None if before < 0.5 else after < 0.5
    return None if before >= 0.5 else after >= 0.5


def _check_flip(q, before, after, distance):
    f = q["flip"]["counterfactual"]
    assert (f["before"], f["after"]) == (pytest.approx(before, abs=1e-12), pytest.approx(after, abs=1e-12))
    assert f["flipped"] == _hand_flip(before, after, distance)


def test_grade_and_explain_report_the_self_check_and_the_flip_and_flag_above_the_limit(home, tmp_path):
    reg = _bundled()
    from medcfx_diffae.model import decode_codes, load_autoencoder, load_input, semantic, stochastic_encode

    env = cli_env(home)
    # grade at the default steps and limit: the bundled vertebra reconstructs within the limit
    p = run_cli(["grade", VERTEBRA, "--grades", "0", "--out", tmp_path / "g"], env=env, check=0)
    res = json.loads((tmp_path / "g" / "vertebra" / "result.json").read_text())
    q = res["quality"]
    assert q["inversion"]["limit"] == cq.INVERSION_LIMIT and not q["inversion"]["flagged"]
    assert q["inversion"]["error"] == pytest.approx(res["reconstruction"]["mae"] / 2, rel=1e-9)
    assert "warning:" not in p.stdout and "0 of 1 case(s) flagged" in p.stdout
    _check_flip(q, res["probability"], res["frames"]["counterfactual"]["score"]["probability"], res["distance"])
    assert q["flip"]["counterfactual"]["flipped"] is True  # P(fractured) 0.99 -> 0.00 (measured)
    assert q["off_target_probability_change"] is None and q["off_target_image_change"] is None
    assert json.loads((tmp_path / "g" / "vertebra" / "provenance.json").read_text())["quality"] == q

    # explain with fewer steps and a tiny limit: flagged, with a warning; the error recomputed here
    p = run_cli(["explain", VERTEBRA, "--method", "diffae", "--model", "diffae-grader-demo", "--reconstruct",
                 "--encode-steps", "40", "--decode-steps", "20", "--inversion-limit", "1e-5",
                 "--out", tmp_path / "e"], env=env, check=0)
    res = json.loads((tmp_path / "e" / "vertebra" / "result.json").read_text())
    q = res["quality"]
    torch.set_num_threads(1)
    ae = load_autoencoder(reg, "diffae-demo")
    x = torch.from_numpy(load_input(VERTEBRA, ae.preprocess, 1)[None])
    z = semantic(ae.model, x)
    rec = decode_codes(ae.model, ae.schedule, stochastic_encode(ae.model, ae.schedule, x, z, 40), z, 20)
    expected = float(((rec - x).abs() / 2).mean())
    assert q["inversion"]["error"] == pytest.approx(expected, rel=1e-3)
    assert q["inversion"]["error"] > 1e-5 and q["inversion"]["flagged"] is True
    assert "warning:" in p.stdout and "not trustworthy" in p.stdout and "1 of 1 case(s) flagged" in p.stdout
    _check_flip(q, res["prediction"]["probability"], res["counterfactual"]["probability"],
                res["prediction"]["distance"])


def test_evaluate_aggregates_are_the_means_of_the_per_image_values(home, tmp_path):
    _bundled()
    from medcfx.demo import make_demo

    data = make_demo("vertebra", tmp_path / "vert", cases=6, seed=1, size=48, graded_fraction=1.0)
    # a lesion box for the first three images (in pixels of the 48 px images): the outside change is
    # reported for exactly these
    with open(data / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(data / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*rows[0], "bbox_fracture"])
        for i, r in enumerate(rows):
            w.writerow([*r.values(), "12;14;36;34" if i < 3 else ""])
    out = tmp_path / "ev"
    limit = 0.02
    run_cli(["evaluate", "diffae", "--model", "diffae-grader-demo", "--data", data, "--out", out, "--baseline=false",
             "--recon-images", "4", "--encode-steps", "30", "--decode-steps", "15", "--inversion-limit", str(limit)],
            env=cli_env(home), check=0)
    agg = json.loads((out / "metrics.json").read_text())["counterfactual_quality"]
    cases = json.loads((out / "counterfactual_quality.json").read_text())["cases"]
    assert [c["case"] for c in cases] == [r["file"] for r in rows[:4]] and agg["cases"] == 4
    errors = [c["inversion"]["error"] for c in cases]
    assert agg["inversion_error_mean"] == pytest.approx(np.mean(errors), abs=1e-12)
    assert [c["inversion"]["flagged"] for c in cases] == [e > limit for e in errors]
    assert agg["flagged_share"] == pytest.approx(np.mean([e > limit for e in errors]), abs=1e-12)
    fl = [c["flip"]["counterfactual"] for c in cases]
    flips = [_hand_flip(f["before"], f["after"], f["distance_before"]) for f in fl]
    assert [f["flipped"] for f in fl] == flips
    counted = [f for f in flips if f is not None]
    assert agg["flip_counted"] == len(counted)
    assert agg["flip_rate"] == (pytest.approx(np.mean(counted), abs=1e-12) if counted else None)
    crossed = [np.sign(f["distance_after"]) != np.sign(f["distance_before"]) for f in fl]
    assert agg["hyperplane_cross_rate"] == pytest.approx(np.mean(crossed), abs=1e-12)
    off = [c["off_target_image_change"] for c in cases]
    assert [v is not None for v in off] == [True, True, True, False]
    assert agg["off_target_image_cases"] == 3
    assert agg["off_target_image_change_mean"] == pytest.approx(np.mean(off[:3]), abs=1e-12)
    assert agg["off_target_probability_change_mean"] is None  # one class: nothing off target to change
    assert "Counterfactual quality" in (out / "metrics.md").read_text()


def test_quality_rules_by_hand():
    x = np.zeros((1, 2, 2))
    assert cq.inversion_check(x, np.full((1, 2, 2), 0.1), 0.04) == {"error": 0.05, "limit": 0.04, "flagged": True}
    assert cq.flip(0.9, 0.2, distance=3.0)["flipped"] is True
    assert cq.flip(0.9, 0.6, distance=3.0)["flipped"] is False
    assert cq.flip(0.4, 0.1, distance=0.5)["flipped"] is None  # Platt offset: already below 0.5
    assert cq.flip(0.1, 0.5, distance=-2.0)["flipped"] is True
    region = cq.box_region((1, 0, 3, 2), (4, 4))
    diff = np.arange(16, dtype=float).reshape(4, 4)
    assert region.sum() == 4 and cq.outside_change(diff, region) == pytest.approx((120 - 14) / 12)
    cases = [cq.case_quality({"error": e, "limit": 0.1, "flagged": e > 0.1}, cq.flip(0.9, a, 1.0))
             for e, a in ((0.05, 0.2), (0.2, 0.7))]
    s = cq.summarise(cases)
    assert s["flagged_share"] == 0.5 and s["flip_rate"] == 0.5 and s["inversion_error_mean"] == pytest.approx(0.125)
