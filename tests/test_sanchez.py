"""The sanchez plugin: Algorithm 1 wiring, training variants, explain outputs, evaluation, sweep, bad input."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import cli_env, run_cli
from medcfx.demo import make_demo
from medcfx.diffusion import Schedule
from medcfx_sanchez.counterfactual import CFParams, counterfactual, heatmap
from medcfx_sanchez.methods import FAST_SAMPLER
from medcfx_sanchez.train import drop_labels, split_cases

TINY = {
    "network": {"image_size": 16, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                "attention_resolutions": [8], "dropout": 0.0, "num_head_channels": 8, "label_tokens": 2,
                "label_token_dim": 8, "num_groups": 4},
    "classifier": {"image_size": 16, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                   "attention_resolutions": [8], "dropout": 0.0, "num_head_channels": 8, "num_groups": 4},
    "diffusion": {"T": 100},
    "preprocess": {"size": 16},
    "train": {"steps": 3, "batch_size": 4, "log_every": 1, "ckpt_every": 3, "ema_decay": 0.5},
    "val_cases": 0.34,
    "val_slices": 2,
    "explain": {"steps": 4, "batch_size": 8},
}


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    root = tmp_path_factory.mktemp("brain")
    make_demo("brain", root / "train", cases=3, seed=0, shape=(32, 32, 12), tumour_free_fraction=0.0)
    return root / "train"


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, brain, tiny_cfg):
    """A tiny sanchez model trained through the CLI into a private MEDCFX_HOME (shared by this module)."""
    home = tmp_path_factory.mktemp("home")
    env = cli_env(home)
    proc = run_cli(["train", "sanchez", "--data", brain, "-c", tiny_cfg, "--device", "cpu",
                    "--runs-dir", home / "runs", "--name", "tiny"], env=env, check=0)
    return home, env, json.loads(proc.stdout[proc.stdout.index("{"):])


# ------------------------------------------------------------------------------ Algorithm 1, no network


def test_label_blind_denoiser_gives_the_input_back_and_an_empty_heatmap():
    """A model that cannot tell healthy from unhealthy changes nothing: encode/decode with CFG is an identity."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 8, 8, generator=g) * 1.6 - 0.8
    c = torch.randn(1, 4, 8, 8, generator=g) * 0.05
    calls = []

    def den(x_t, t, cond):
        calls.append(len(x_t))
        return c * torch.cos(t.float() / 100).reshape(-1, 1, 1, 1)  # ignores x and the label

    sched = Schedule.create("linear", 1000)
    x_cf = counterfactual(den, x, sched, CFParams(guidance=3.0, noise_level=0.75, steps=20, dn_percentile=0),
                          null_label=2)
    torch.testing.assert_close(x_cf, x, atol=1e-5, rtol=0)
    assert float(heatmap(x, x_cf).max()) < 1e-5
    # L = round(0.75 * 20) = 15 encode calls of batch 2, then 15 guided decode calls of batch 4 (one forward)
    assert calls == [2] * 15 + [4] * 15


def test_healthy_guidance_moves_the_decode_towards_the_healthy_class():
    """Analytic two-class model: eps_c is the optimal noise predictor of a point mass at mu_c. Guided towards
    'healthy', the counterfactual of an 'unhealthy' image lands on the healthy point; null-guided it stays."""
    mu = {0: torch.zeros(1, 1, 4, 4), 1: torch.ones(1, 1, 4, 4) * 0.5}
    sched = Schedule.create("linear", 1000)

    def den(x_t, t, cond):
        a = sched.abar(t)
        y = cond["y"]
        centre = torch.where((y == 1).reshape(-1, 1, 1, 1), mu[1], mu[0])
        centre = torch.where((y == 2).reshape(-1, 1, 1, 1), (mu[0] + mu[1]) / 2, centre)
        return (x_t - a.sqrt() * centre) / (1 - a).sqrt()

    x = mu[1].clone()
    cf = counterfactual(den, x, sched, CFParams(guidance=1.0, noise_level=1.0, steps=50, dn_percentile=0), null_label=2)
    assert float((cf - mu[0]).abs().max()) < 0.05 < float((x - mu[0]).abs().max())
    same = counterfactual(den, x, sched, CFParams(guidance=0.0, noise_level=0.5, steps=50, dn_percentile=0), null_label=2)
    assert float((same - x).abs().max()) < float((cf - x).abs().max())


def test_solver_choice_reaches_both_loops():
    """With solver="dpm++2m" the counterfactual is exactly the DPM-Solver++(2M) encode + guided decode (and
    differs from DDIM's), with the paper's null-label encode and healthy-label decode."""
    from medcfx.diffusion import classifier_free, decode, encode

    sched = Schedule.create("linear", 1000)
    w = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))

    def den(x_t, t, cond):  # depends on x, t and the label, smooth in all three
        return 0.3 * x_t + w * (cond["y"].float() - 1).reshape(-1, 1, 1, 1) * (t.float() / 1000).reshape(-1, 1, 1, 1)

    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(4)) - 0.5
    p = CFParams(guidance=2.0, noise_level=0.6, steps=20, dn_percentile=0, solver="dpm++2m")
    got = counterfactual(den, x, sched, p, null_label=2)
    grid = sched.respace("ddim20")
    from medcfx_sanchez.counterfactual import x0_process

    proc = x0_process(0)
    x_l = encode(den, x, grid, 12, cond={"y": torch.full((2,), 2)}, x0_process=proc, solver="dpm++2m")
    want = decode(classifier_free(den, 2.0, 2), x_l, grid, 12, cond={"y": torch.zeros(2, dtype=torch.long)},
                  x0_process=proc, solver="dpm++2m")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ddim = counterfactual(den, x, sched, CFParams(guidance=2.0, noise_level=0.6, steps=20, dn_percentile=0),
                          null_label=2)
    assert float((ddim - got).abs().max()) > 1e-4


def test_guidance_interval_counts_guided_steps_and_bounds_reproduce_the_one_branch_loops():
    """--guidance-interval LO:HI guides exactly the decode steps whose model timestep t has LO <= t/T <= HI
    (a forward of 2B, counted against the respaced grid by brute force) and runs the healthy branch alone
    (a forward of B) at the others; the interval 0:1 is the paper's loop bit for bit, and an interval that
    holds no decode step is bit for bit the conditional-only decode (guidance w = 1)."""
    sched = Schedule.create("linear", 1000)
    w = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    calls = []

    def den(x_t, t, cond):
        calls.append((len(x_t), int(t[0])))
        return 0.3 * x_t + w * (cond["y"].float() - 1).reshape(-1, 1, 1, 1) * (t.float() / 1000).reshape(-1, 1, 1, 1)

    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(6)) - 0.5
    base = dict(noise_level=0.75, steps=40, dn_percentile=0.99)
    for solver in ("ddim", "dpm++2m"):
        calls.clear()
        got = counterfactual(den, x, sched, CFParams(guidance=3.0, guidance_interval="0.2:0.5", solver=solver,
                                                     **base).check(), null_label=2)
        grid = sched.respace("ddim40")
        L = grid.level_for_fraction(0.75)
        decode_t = [grid.t_of(k) for k in range(L, 0, -1)]
        assert [t for _, t in calls[L:]] == decode_t
        assert [b for b, _ in calls[L:]] == [4 if 200 <= t <= 500 else 2 for t in decode_t]
        assert 0 < sum(b == 4 for b, _ in calls[L:]) < L
        full = counterfactual(den, x, sched, CFParams(guidance=3.0, guidance_interval="0:1", solver=solver, **base),
                              null_label=2)
        paper = counterfactual(den, x, sched, CFParams(guidance=3.0, solver=solver, **base), null_label=2)
        assert torch.equal(full, paper) and float((got - paper).abs().max()) > 1e-4
        none = counterfactual(den, x, sched, CFParams(guidance=3.0, guidance_interval="1:1", solver=solver, **base),
                              null_label=2)
        cond_only = counterfactual(den, x, sched, CFParams(guidance=1.0, solver=solver, **base), null_label=2)
        assert torch.equal(none, cond_only)


@pytest.mark.parametrize("solver", ["ddim", "dpm++2m"])
def test_reuse_inversion_takes_the_null_branch_from_the_encode(solver):
    """--reuse-inversion: every decode step at a timestep the encode evaluated runs one forward of B (the
    healthy branch) and uses the encode's null prediction; a denoiser whose null prediction does not depend on
    x makes that exact, so the result equals the two-branch loop (to round-off); with an x-dependent null
    branch the two differ."""
    sched = Schedule.create("linear", 1000)
    w = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    calls = []

    def x_free_null(x_t, t, cond):  # the null label's eps ignores x; the healthy label's does not
        calls.append(len(x_t))
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1)
        null = (cond["y"] == 2).reshape(-1, 1, 1, 1)
        return torch.where(null, w * tt, 0.3 * x_t - w * tt)

    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(8)) - 0.5
    base = dict(guidance=3.0, noise_level=0.75, steps=20, dn_percentile=0.99, solver=solver)
    reused = counterfactual(x_free_null, x, sched, CFParams(reuse_inversion=True, **base), null_label=2)
    L = sched.respace("ddim20").level_for_fraction(0.75)
    decode_batches = calls[L:]
    grid = sched.respace("ddim20")
    encoded_t = {grid.t_of(k) for k in range(1, L + 1)} if solver == "ddim" else \
        {grid.t_of(1), grid.t_of(2)} | {grid.t_of(k - 1) for k in range(3, L + 1)}
    assert decode_batches == [2 if grid.t_of(k) in encoded_t else 4 for k in range(L, 0, -1)]
    assert sum(b == 2 for b in decode_batches) >= L - 1
    calls.clear()
    both = counterfactual(x_free_null, x, sched, CFParams(**base), null_label=2)
    assert calls[L:] == [4] * L
    torch.testing.assert_close(reused, both, rtol=0, atol=1e-6)

    def x_null(x_t, t, cond):  # now the null branch depends on x: reuse is an approximation
        return x_free_null(x_t, t, cond) + 0.2 * x_t * (cond["y"] == 2).reshape(-1, 1, 1, 1)

    a = counterfactual(x_null, x, sched, CFParams(reuse_inversion=True, **base), null_label=2)
    b = counterfactual(x_null, x, sched, CFParams(**base), null_label=2)
    assert float((a - b).abs().max()) > 1e-4


@pytest.mark.parametrize("bad", ["0.5", "a:b", "0.6:0.4", "-0.1:1", "0:1.5", "0:1:2"])
def test_bad_guidance_intervals_are_refused_naming_the_option(bad):
    from medcfx.errors import UsageError

    with pytest.raises(UsageError, match="--guidance-interval"):
        CFParams(guidance_interval=bad).check()
    assert CFParams(guidance_interval="0.20:1.0").check().guidance_interval == "0.2:1"


def test_cfg_label_dropout_rate_and_case_split():
    y = torch.zeros(20000, dtype=torch.long)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    frac = float((drop_labels(y, u, 0.35, 2) == 2).float().mean())
    assert abs(frac - 0.35) < 0.015  # 4.5 sigma of a Binomial(20000, 0.35) share
    train, val = split_cases(np.array(["a", "a", "b", "c", "d", "e"]), 0.2, seed=3)
    assert len(val) == 1 and not (train & val) and train | val == {"a", "b", "c", "d", "e"}
    assert split_cases(np.array(["a", "a"]), 0.5, 0) == ({"a"}, set())


@pytest.mark.parametrize("bad", [dict(noise_level=0), dict(noise_level=1.5), dict(steps=0), dict(dn_percentile=0.2),
                                 dict(guidance=-1), dict(solver="heun"),
                                 dict(noise_level=0.04, steps=10)])  # L = round(0.4) = 0: no encoding at all
def test_bad_sampling_parameters_are_refused(bad):
    from medcfx.errors import UsageError

    with pytest.raises(UsageError):
        CFParams(**bad).check()


# ------------------------------------------------------------------------------ through the CLI


def test_training_registers_config_metrics_and_provenance(trained, brain):
    home, env, out = trained
    entry = json.loads(run_cli(["models", "show", out["model"], "--json"], env=env, check=0).stdout)
    assert entry["method"] == "sanchez"
    net = entry["config"]["network"]
    assert net["attention_conditioning"] is True and net["num_classes"] == 2 and net["in_channels"] == 4
    assert entry["config"]["preprocess"]["size"] == 16 and entry["config"]["cfg_dropout"] == 0.35
    assert {"val_pixel_AUPRC", "val_pixel_ideal_Dice", "final_loss", "train_slices"} <= set(entry["metrics"])
    assert entry["provenance"]["steps"] == 3 and len(entry["provenance"]["data_fingerprint"]) == 64
    run = Path(out["run"])
    assert (run / "config.yaml").is_file() and (run / "progress.png").is_file()


def test_adagn_baseline_has_no_attention_tokens(trained, brain, tiny_cfg):
    home, env, _ = trained
    proc = run_cli(["train", "sanchez", "--data", brain, "-c", tiny_cfg, "--set", "conditioning=adagn",
                    "--set", "val_slices=0", "--device", "cpu", "--runs-dir", home / "runs", "--name", "adagn"],
                   env=env, check=0)
    ref = json.loads(proc.stdout[proc.stdout.index("{"):])["model"]
    net = json.loads(run_cli(["models", "show", ref, "--json"], env=env, check=0).stdout)["config"]["network"]
    assert net["attention_conditioning"] is False and net["label_in_time_embedding"] is True


def test_explain_a_case_folder_writes_aligned_volumes_panels_and_provenance(trained, brain, tmp_path):
    home, env, out = trained
    case = brain / "demo_00001"
    res = run_cli(["explain", case, "--model", out["model"], "--out", tmp_path / "o", "--device", "cpu"], env=env, check=0)
    summary = json.loads(res.stdout)
    folder = Path(summary["cases"][0]["folder"])
    src = nib.load(str(case / "demo_00001_flair.nii.gz"))
    for name in ("heatmap", "counterfactual_t1", "counterfactual_t1ce", "counterfactual_t2", "counterfactual_flair"):
        img = nib.load(str(folder / f"{name}.nii.gz"))
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine)
    hm = nib.load(str(folder / "heatmap.nii.gz")).get_fdata()
    assert np.isfinite(hm).all() and hm.min() >= 0
    panels = sorted((folder / "panels").glob("slice_*.png"))
    assert len(panels) == summary["cases"][0]["slices"] > 1
    assert Image.open(panels[0]).size[0] > 3 * 16 * 3  # four tiles (input, cf, heatmap, mask) at scale 3
    prov = json.loads((folder / "provenance.json").read_text())
    entry = json.loads(run_cli(["models", "show", out["model"], "--json"], env=env, check=0).stdout)
    assert prov["model_sha256"] == entry["digest"] and prov["params"]["guidance"] == 3.0
    # the fast sampler (the default) runs dpm++2m at 0.4 x the model's saved 4 steps (round(1.6) = 2)
    assert prov["params"]["noise_level"] == 0.75 and prov["params"]["sampler"] == "fast"
    assert prov["params"]["steps"] == 2 and prov["params"]["solver"] == "dpm++2m"
    assert {Path(i["path"]).name for i in prov["inputs"]} >= {"demo_00001_flair.nii.gz", "demo_00001_seg.nii.gz"}
    # --slice explains one slice only, and options after the input path are understood
    k = int(prov["slices"][len(prov["slices"]) // 2])
    res = run_cli(["explain", case, "--model", out["model"], "--out", tmp_path / "one", "--slice", k, "--guidance", "1.5",
                   "--solver", "dpm++2m"], env=env, check=0)
    one = json.loads(res.stdout)["cases"][0]
    prov_one = json.loads((tmp_path / "one" / "demo_00001" / "provenance.json").read_text())
    assert prov_one["params"]["solver"] == "dpm++2m" and prov_one["params"]["guidance"] == 1.5
    assert one["slices"] == 1 and one["most_anomalous_slice"] == k
    assert [p.name for p in (tmp_path / "one" / "demo_00001" / "panels").iterdir()] == [f"slice_{k:03d}.png"]


def test_explain_2d_image_heatmap_is_channel_mean_abs_difference(trained, tmp_path, tiny_cfg):
    """A 1-channel model on a PNG at the model's own size: the written map equals mean |x - x_cf|."""
    home, env, _ = trained
    rng = np.random.default_rng(0)
    data = tmp_path / "folder"
    for sub in ("normal", "abnormal"):
        (data / sub).mkdir(parents=True)
        for i in range(4):
            img = (rng.random((16, 16)) * 120 + (100 if sub == "abnormal" else 0)).astype(np.uint8)
            Image.fromarray(img).save(data / sub / f"{i}.png")
    proc = run_cli(["train", "sanchez", "--data", data, "-c", tiny_cfg, "--set", "network.in_channels=1",
                    "--set", "network.out_channels=1", "--set", "val_slices=0", "--device", "cpu",
                    "--runs-dir", home / "runs", "--name", "grey"], env=env, check=0)
    ref = json.loads(proc.stdout[proc.stdout.index("{"):])["model"]
    png = data / "abnormal" / "2.png"
    run_cli(["explain", png, "--model", ref, "--out", tmp_path / "o"], env=env, check=0)
    folder = tmp_path / "o" / "2"
    hm = np.load(folder / "heatmap.npy")
    cf = np.load(folder / "counterfactual_c0.npy") * 2 - 1
    x = np.asarray(Image.open(png), dtype=np.float32)
    x = np.clip(x / np.percentile(x, 99), 0, 1) * 2 - 1  # the percentile rule the model recorded (min 0)
    assert hm.shape == (16, 16)
    np.testing.assert_allclose(hm, np.abs(x - cf), atol=1e-5)


def test_bad_inputs_are_one_line_errors_and_write_nothing(trained, brain, tmp_path):
    home, env, out = trained
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(rgb)
    import shutil

    nan = tmp_path / "nan_case"
    shutil.copytree(brain / "demo_00000", nan)
    flair = nib.load(str(nan / "demo_00000_flair.nii.gz"))
    vol = flair.get_fdata().astype(np.float32)
    vol[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(vol, flair.affine), str(nan / "demo_00000_flair.nii.gz"))
    single = brain / "demo_00000" / "demo_00000_t1.nii.gz"
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti" * 10)
    cases = [
        ([rgb], "has 3 channel(s) but the model expects 4", 1),
        ([single], "model expects 4", 1),
        ([corrupt], "cannot read", 1),  # said as unreadable, not as a one-channel volume
        ([nan], "NaN", 1),
        ([tmp_path / "missing.png"], "no such file", 2),
    ]
    for inputs, message, code in cases:
        o = tmp_path / f"out-{inputs[0].name.split('.')[0]}"
        proc = run_cli(["explain", *inputs, "--model", out["model"], "--out", o], env=env)
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert proc.stdout == "", proc.stdout  # nothing written: no summary of no cases
        assert not o.exists() or not any(p for p in o.iterdir() if not p.name.startswith(".")), list(o.iterdir())
    proc = run_cli(["explain", single, "--model", "nosuch", "--out", tmp_path / "x"], env=env)
    assert proc.returncode == 1 and "unknown model 'nosuch'" in proc.stderr
    proc = run_cli(["explain", brain / "demo_00000", "--model", out["model"], "--slice", "999", "--out", tmp_path / "x"], env=env)
    assert proc.returncode == 2 and "--slice 999" in proc.stderr
    proc = run_cli(["explain", brain / "demo_00000", "--model", out["model"], "--solver", "heun", "--out", tmp_path / "y"],
                   env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "heun" in proc.stderr, proc.stderr
    assert not (tmp_path / "y").exists()


def test_tampered_weights_are_refused(trained, brain, tmp_path):
    home, env, out = trained
    entry = json.loads(run_cli(["models", "show", out["model"], "--json"], env=env, check=0).stdout)
    blob = Path(entry["artifacts"]["weights"]["file"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    original = blob.read_bytes()
    blob.write_bytes(bytes(data))
    try:
        proc = run_cli(["explain", brain / "demo_00000", "--model", out["model"], "--out", tmp_path / "t"], env=env)
        assert proc.returncode == 3 and "failed sha256 verification" in proc.stderr
        assert proc.stderr.count("\n") == 1
    finally:
        blob.write_bytes(original)


def test_threshold_evaluation_matches_sklearn(brain, tmp_path, home):
    """The whole evaluate path (cases read one at a time, maps on each input's own grid, streamed per-case
    metrics, bootstrap, report) against scikit-learn on the pooled foreground voxels; the baseline's map
    recomputed here from the FLAIR file read by nibabel (/ median foreground intensity, 5 x 5 median filter per
    axial slice at the native resolution) and the lesion from the _seg files."""
    import nibabel as nib
    from scipy.ndimage import median_filter
    from sklearn.metrics import average_precision_score, roc_auc_score

    from medcfx.data.preprocess import PreprocessConfig
    from medcfx.inputs import iter_cases

    env = cli_env(home)
    run_cli(["evaluate", "threshold", "--data", brain, "--out", tmp_path / "ev", "--batch-size", "3",
             "--n-resamples", "50"], env=env, check=0)
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    got = report["metrics"]
    assert report["size"] == "native" and report["median_filter"] == 5 and report["channel"] == "flair"
    scores, labels = [], []
    for case in iter_cases(brain, PreprocessConfig(size=0, percentile=50, clip=False), 4):
        flair = np.asarray(nib.load(str(brain / case.id / f"{case.id}_flair.nii.gz")).dataobj, np.float64)
        seg = np.asarray(nib.load(str(next((brain / case.id).glob("*_seg.nii.gz")))).dataobj) > 0
        fg = case.result.foreground  # medcfx's scoring region; the map itself is recomputed here
        u = flair / np.median(flair[fg])
        heat = np.zeros(flair.shape)
        for k in case.slice_index:  # the slices the baseline maps (enough foreground); the others stay 0
            heat[:, :, k] = median_filter(u[:, :, k], size=5, mode="nearest")
        scores.append(heat[fg])
        labels.append(seg[fg])
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    assert report["counts"]["pixels"] == len(scores) and report["counts"]["lesion_pixels"] == labels.sum()
    assert abs(got["pixel_AUPRC"] - average_precision_score(labels, scores)) < 1e-3
    assert abs(got["pixel_AUROC"] - roc_auc_score(labels, scores)) < 1e-3
    lo, hi = report["intervals"]["pixel_AUPRC"]["ci_low"], report["intervals"]["pixel_AUPRC"]["ci_high"]
    assert lo <= got["pixel_AUPRC"] <= hi
    assert len(report["per_case"]) == report["counts"]["cases"]
    assert (tmp_path / "ev" / "metrics.md").read_text().startswith("# threshold on train")


def test_sweep_recommends_the_best_pair(trained, brain, tmp_path):
    home, env, out = trained
    proc = run_cli(["sweep", "sanchez", "--model", out["model"], "--data", brain, "--guidance", "0,3",
                    "--noise-level", "0.5", "--max-slices", "4", "--solver", "dpm++2m", "--steps", "4",
                    "--out", tmp_path / "sw"],
                   env=env, check=0)
    res = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    # the flags reached the sampler (the fast sampler's own 2 steps would encode 0.5 of them to t = 0: refused)
    assert res["settings"]["solver"] == "dpm++2m" and res["settings"]["steps"] == 4
    assert [(r["guidance"], r["noise_level"]) for r in res["rows"]] == [(0.0, 0.5), (3.0, 0.5)]
    best = max(res["rows"], key=lambda r: r["pixel_ideal_Dice"])
    assert res["recommended"] == best
    assert f"--guidance {best['guidance']:g} --noise-level 0.5" in proc.stdout


# ------------------------------------------------------------------------------ the bundled demo model


def test_bundled_demo_model_leaves_healthy_slices_nearly_unchanged_and_marks_lesions(tmp_path, home):
    """The trained demo model (models/, registry.yaml) on a tumour-free brain and on the bundled tumour case."""
    root = Path(__file__).resolve().parents[1]
    env = cli_env(home)
    healthy = make_demo("brain", tmp_path / "h", cases=1, seed=11, shape=(120, 120, 78), tumour_free_fraction=1.0)
    case = next(p for p in healthy.iterdir() if p.is_dir())
    for f in case.iterdir():  # six central slices keep the test short
        img = nib.load(str(f))
        nib.save(img.slicer[:, :, 36:42], str(f))
    run_cli(["explain", case, "--model", "sanchez-demo", "--out", tmp_path / "o", "--device", "cpu"], env=env, check=0)
    h = nib.load(str(tmp_path / "o" / case.name / "heatmap.nii.gz")).get_fdata()
    sick = root / "models" / "demo-inputs" / "brain" / "demo_case"
    run_cli(["explain", sick, "--model", "sanchez-demo", "--out", tmp_path / "o", "--device", "cpu"], env=env, check=0)
    s = nib.load(str(tmp_path / "o" / "demo_case" / "heatmap.nii.gz")).get_fdata()
    seg = nib.load(str(sick / "demo_case_seg.nii.gz")).get_fdata() > 0
    brain = nib.load(str(case / f"{case.name}_flair.nii.gz")).get_fdata() > 0
    lesion = float(np.median(s[seg]))
    assert float(h[brain].mean()) < lesion / 3  # a healthy brain changes far less than a tumour does
    assert float(np.percentile(h[brain], 95)) < lesion  # and nowhere as much as inside a tumour
    assert float(s[seg].mean()) > 3 * float(s[~seg & (s > 0)].mean())  # the heatmap concentrates on the lesion


def _request(method, options=None, explain=None):
    """A request as the CLI makes it: ``explain`` are the keys the user set with -c / --set."""
    from types import SimpleNamespace

    from medcfx.config import deep_merge
    from medcfx.plugins import get_plugins

    m = get_plugins().method(method)
    config = deep_merge(m.defaults, {"explain": explain or {}})
    return SimpleNamespace(method=m, options=options or {}, config=config, user_config={"explain": explain or {}})


FAST_STEPS = round(100 * FAST_SAMPLER["step_fraction"])  # of a model saved with 100 steps


@pytest.mark.parametrize("method, options, explain, want", [
    # the fast sampler's own values, whatever the model saved at training
    ("sanchez", {}, {}, ("fast", "dpm++2m", FAST_STEPS, "0:1", True)),
    # the paper's loop: the model's saved steps and solver, guidance at every step
    ("sanchez", {"sampler": "paper"}, {}, ("paper", "ddim", 100, "0:1", False)),
    # a flag or a --set value beats the sampler's value
    ("sanchez", {"steps": 7}, {}, ("fast", "dpm++2m", 7, "0:1", True)),
    ("sanchez", {"guidance_interval": "0.3:1"}, {"steps": 30}, ("fast", "dpm++2m", 30, "0.3:1", True)),
    ("sanchez", {"sampler": "paper", "solver": "dpm++2m"}, {}, ("paper", "dpm++2m", 100, "0:1", False)),
    ("sanchez", {"sampler": "paper", "reuse_inversion": True}, {}, ("paper", "ddim", 100, "0:1", True)),
    # --set values equal to the method's defaults still beat the fast sampler's (they were given)
    ("sanchez", {}, {"steps": 100, "solver": "ddim", "reuse_inversion": False}, ("fast", "ddim", 100, "0:1", False)),
    # the baselines keep the paper's loop by default; their fast sampler has no null branch to reuse
    ("cdpm-classifier", {}, {}, ("paper", "ddim", 100, "0:1", False)),
    ("cdpm-healthy", {"sampler": "fast"}, {}, ("fast", "dpm++2m", FAST_STEPS, "0:1", False)),
])
def test_sampler_presets_and_their_precedence(method, options, explain, want):
    from types import SimpleNamespace

    from medcfx_sanchez.methods import _params

    saved = SimpleNamespace(config={"explain": {"steps": 100, "solver": "ddim", "guidance": 3.0}})
    p = _params(_request(method, options, explain), method, saved)
    assert (p.sampler, p.solver, p.steps, p.guidance_interval, p.reuse_inversion) == want
    if method == "sanchez" and want[0] == "fast" and not options.keys() & {"steps", "guidance_interval"} and not explain:
        assert (p.solver, p.guidance_interval, p.reuse_inversion) == tuple(
            FAST_SAMPLER[k] for k in ("solver", "guidance_interval", "reuse_inversion"))


def test_settings_that_encode_to_no_noise_are_refused():
    """--steps 1 gives the grid [t = 0]: L = 1 encodes to model timestep 0, so the counterfactual is the input
    (a heatmap of about 0, a perfect self-check: a plausible "no lesion"). Refused, naming --steps; 2 steps
    (t = 500) pass."""
    from types import SimpleNamespace

    from medcfx.errors import UsageError
    from medcfx_sanchez.methods import _params

    saved = SimpleNamespace(config={"explain": {"steps": 100}, "diffusion": {"schedule": "linear", "T": 1000}})
    with pytest.raises(UsageError, match="--steps 1 with --noise-level 0.75 encodes only to model timestep 0"):
        _params(_request("sanchez", {"steps": 1}), "sanchez", saved)
    assert _params(_request("sanchez", {"steps": 2}), "sanchez", saved).steps == 2
    # the fast sampler itself never picks a grid that encodes to t = 0: a model saved with 2 steps (0.4 x 2 =
    # 0.8) keeps 2; one saved with 6 steps at noise level 0.5 gets 3 (2 would give L = 1, t = 0), not 0.4 x 6
    saved.config["explain"]["steps"] = 2
    assert _params(_request("sanchez"), "sanchez", saved).steps == 2
    saved.config["explain"].update(steps=6, noise_level=0.5)
    p = _params(_request("sanchez"), "sanchez", saved)
    assert p.steps == 3 and round(p.noise_level * p.steps) == 2


def test_guidance_interval_is_refused_for_the_unguided_baseline():
    from types import SimpleNamespace

    from medcfx.errors import UsageError
    from medcfx_sanchez.methods import _params

    with pytest.raises(UsageError, match="--guidance-interval: cdpm-healthy decodes without guidance"):
        _params(_request("cdpm-healthy", {"guidance_interval": "0.2:1"}), "cdpm-healthy",
                SimpleNamespace(config={"explain": {}}))
    with pytest.raises(UsageError, match="--reuse-inversion: cdpm-classifier has no classifier-free null branch"):
        _params(_request("cdpm-classifier", {"reuse_inversion": True}), "cdpm-classifier",
                SimpleNamespace(config={"explain": {}}))


def test_print_config_says_which_explain_keys_the_sampler_replaces(home):
    fast = run_cli(["explain", "models/demo-inputs/brain/demo_case", "--model", "sanchez-demo", "--print-config"],
                   env=cli_env(home), check=0).stdout.splitlines()
    assert any(ln.startswith("# explain.sampler fast: the run uses dpm++2m at 0.4 x") for ln in fast)
    paper = run_cli(["explain", "models/demo-inputs/brain/demo_case", "--model", "sanchez-demo", "--print-config",
                     "--set", "explain.sampler=paper"], env=cli_env(home), check=0).stdout.splitlines()
    assert any(ln.startswith("# explain.sampler paper: the authors' loop") for ln in paper)
