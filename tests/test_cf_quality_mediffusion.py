"""mediffusion counterfactual quality (issue 16): the inversion self-check, the flip rate and the off-target
change, per case in explain and aggregated by evaluate, on the bundled mediffusion-demo model. Expected
values are recomputed here: the unguided reconstruction through the core sampler (not the plugin's
counterfactual code), the flips and off-target changes by hand from the probabilities in the same output."""

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
from medcfx_mediffusion import quality as cq  # noqa: E402
from medcfx_mediffusion.counterfactual import parse_targets  # noqa: E402

CXR = ROOT / "models" / "demo-inputs" / "cxr.png"
STEPS = 10


def _bundled():
    reg = Registry(ROOT / "no-user-home", bundled=ROOT / "registry.yaml")
    if not CXR.exists() or "mediffusion-demo" not in {e.name for e in reg.entries()}:
        pytest.skip("the bundled mediffusion demo model is not in this checkout")
    return reg


def _hand_flip(before, after, add):
    if add:
        return None if before >= 0.5 else after >= 0.5
    return None if before < 0.5 else after < 0.5


def _unguided_error(reg, png, t, steps, seed=0):
    """mean |x - D(reverse chain from the forward-noised latent, no guidance)| in [0, 1], with the core
    sampler on the grid round(linspace(0, t, steps))."""
    from medcfx.data import PreprocessConfig
    from medcfx.diffusion import Respaced, Schedule, TorchDenoiser, sample
    from medcfx_mediffusion.data import load_joint, read_input

    torch.set_num_threads(1)
    model, codec, entry = load_joint(reg, "mediffusion-demo")
    x, _ = read_input(png, PreprocessConfig.from_dict(entry.config["preprocess"]), 1)
    sched = Schedule.create("linear", 1000)
    z0 = codec.encode(x)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=g)
    abar_t = sched.alphas_cumprod[t].float()
    z_t = abar_t.sqrt() * z0 + (1 - abar_t).sqrt() * noise
    ts = torch.unique(torch.linspace(0, t, steps, dtype=torch.float64).round().long())
    grid = Respaced(ts, torch.cat([torch.ones(1, dtype=torch.float64), sched.alphas_cumprod[ts]]))
    with torch.no_grad():
        z = sample(TorchDenoiser(model.unet), tuple(z0.shape), grid, noise=z_t, ddpm=True, generator=g)
    u_rec = ((codec.decode(z).clamp(-1, 1) + 1) / 2)[0].numpy()
    return float(np.abs(u_rec - ((x + 1) / 2)[0].numpy()).mean())


def test_explain_reports_self_check_flip_and_off_target_change_and_flags_above_the_limit(home, tmp_path):
    reg = _bundled()
    env = cli_env(home)
    args = ["explain", CXR, "--model", "mediffusion-demo", "--target", "no-cardiomegaly", "--steps", STEPS]
    runs = {}
    for name, extra in (("default", []), ("tiny", ["--inversion-limit", "1e-4"])):
        p = run_cli([*args, *extra, "--out", tmp_path / name], env=env, check=0)
        runs[name] = (p.stdout, json.loads((tmp_path / name / "cxr" / "provenance.json").read_text()))
    expected = _unguided_error(reg, CXR, 300, STEPS)
    for name, (stdout, prov) in runs.items():
        q = prov["quality"]
        inv = q["inversion"]
        # the self-check error is the unguided chain's, recomputed here through the core sampler
        assert inv["error"] == pytest.approx(expected, abs=2e-4)
        assert inv["flagged"] == (inv["error"] > inv["limit"])
        assert ("warning:" in stdout and "not trustworthy" in stdout) == inv["flagged"]
        probs = prov["probabilities"]
        b, a = probs["cardiomegaly"]["before"], probs["cardiomegaly"]["after"]
        assert q["flip"]["no-cardiomegaly"]["flipped"] == _hand_flip(b, a, add=False)
        others = ["effusion", "nodule"]
        assert q["off_target_findings"] == others
        assert q["off_target_probability_change"] == pytest.approx(
            np.mean([abs(probs[f]["after"] - probs[f]["before"]) for f in others]), abs=1e-12)
        assert q["off_target_image_change"] is None  # a single input has no lesion box
    assert runs["default"][1]["quality"]["inversion"]["limit"] == cq.INVERSION_LIMIT
    assert not runs["default"][1]["quality"]["inversion"]["flagged"]  # the demo radiograph is trustworthy
    assert runs["tiny"][1]["quality"]["inversion"]["flagged"]
    assert "1 of 1 case(s) flagged" in runs["tiny"][0] and "0 of 1 case(s) flagged" in runs["default"][0]
    # the noise does not depend on the limit: the same counterfactual both times
    assert runs["tiny"][1]["probabilities"] == runs["default"][1]["probabilities"]


def test_evaluate_aggregates_are_the_means_of_the_per_image_values(home, tmp_path):
    _bundled()
    from medcfx.demo import make_demo

    data = make_demo("chest", tmp_path / "chest", cases=8, seed=1, size=64)
    out = tmp_path / "ev"
    run_cli(["evaluate", "mediffusion", "--model", "mediffusion-demo", "--data", data, "--out", out,
             "--cf-images", "3", "--cf-target", "no-cardiomegaly", "--set", f"explain.steps={STEPS}",
             "--inversion-limit", "0.04"], env=cli_env(home), check=0)
    metrics = json.loads((out / "metrics.json").read_text())
    agg = metrics["counterfactual_quality"]
    per = json.loads((out / "counterfactual_quality.json").read_text())
    cases = per["cases"]
    # the images checked are the first ones labelled with cardiomegaly
    with open(data / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    positives = [r["file"] for r in rows if r["cardiomegaly"] == "1"]
    assert [c["case"] for c in cases] == positives[:3] and agg["eligible_images"] == len(positives)
    assert agg["cases"] == 3 and per["summary"]["cases"] == 3
    errors = [c["inversion"]["error"] for c in cases]
    assert agg["inversion_error_mean"] == pytest.approx(np.mean(errors), abs=1e-12)
    assert agg["flagged_share"] == pytest.approx(np.mean([e > 0.04 for e in errors]), abs=1e-12)
    assert [c["inversion"]["flagged"] for c in cases] == [e > 0.04 for e in errors]
    flips = [_hand_flip(c["probabilities"]["cardiomegaly"]["before"], c["probabilities"]["cardiomegaly"]["after"],
                        add=False) for c in cases]
    counted = [f for f in flips if f is not None]
    assert agg["flip_counted"] == len(counted) and agg["flip_rate"] == pytest.approx(np.mean(counted), abs=1e-12)
    off_p = [np.mean([abs(c["probabilities"][f]["after"] - c["probabilities"][f]["before"])
                      for f in ("effusion", "nodule")]) for c in cases]
    assert agg["off_target_probability_change_mean"] == pytest.approx(np.mean(off_p), abs=1e-12)
    # every checked image has a cardiomegaly box: the outside-box change is reported for each
    off_img = [c["off_target_image_change"] for c in cases]
    assert all(v is not None and v > 0 for v in off_img) and {c["off_target_region"] for c in cases} == {"box"}
    assert agg["off_target_image_change_mean"] == pytest.approx(np.mean(off_img), abs=1e-12)
    assert "Counterfactual quality" in (out / "metrics.md").read_text()


def test_quality_rules_by_hand():
    findings = ["a", "b", "c"]
    targets = parse_targets("no-a,b", findings)
    q = cq.case_quality(findings, targets, [0.9, 0.7, 0.2], [0.1, 0.8, 0.5],
                        cq.inversion_check(np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.25), 0.2))
    assert q["flip"]["no-a"]["flipped"] is True  # 0.9 -> 0.1: removed
    assert q["flip"]["b"]["flipped"] is None  # already above 0.5: not counted
    assert q["off_target_findings"] == ["c"] and q["off_target_probability_change"] == pytest.approx(0.3)
    assert q["inversion"] == {"error": 0.25, "limit": 0.2, "flagged": True}
    assert cq.flipped(0.49, 0.5, add=True) is True and cq.flipped(0.5, 0.49, add=False) is True
    assert cq.flipped(0.2, 0.49, add=True) is False and cq.flipped(0.5, 0.5, add=False) is False
    # a box (x0, y0, x1, y1) covers the pixels whose centres lie inside; the change outside it
    region = cq.box_region([(1, 0, 3, 2), (np.nan,) * 4], (4, 4))
    assert region.sum() == 4 and region[0:2, 1:3].all()
    diff = np.arange(16, dtype=float).reshape(4, 4)
    assert cq.outside_change(diff, region) == pytest.approx((diff.sum() - (1 + 2 + 5 + 6)) / 12)
    assert cq.box_region([(np.nan,) * 4], (4, 4)) is None and cq.outside_change(diff, None) is None
    s = cq.summarise([q, {**q, "flip": {"no-a": {"flipped": False}}, "inversion": {**q["inversion"], "error": 0.1,
                                                                                   "flagged": False}}])
    assert s["flip_rate"] == 0.5 and s["flip_counted"] == 2 and s["flagged_share"] == 0.5
    assert s["inversion_error_mean"] == pytest.approx(0.175) and s["off_target_image_change_mean"] is None
