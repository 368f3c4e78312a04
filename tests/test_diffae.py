"""diffae plugin: latent algebra against hand-computed numbers, classifiers against scikit-learn, the grader
artifact, DDIM encode/decode with an analytic denoiser and the bundled demo model, and the CLI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from conftest import cli_env, run_cli  # noqa: E402

from medcfx.errors import IntegrityError, MedcfxError, UsageError  # noqa: E402
from medcfx.registry import Registry  # noqa: E402
from medcfx_diffae.grader import Grader, Hyperplane, binary_targets, fit_grader, load_grader  # noqa: E402
from medcfx_diffae.model import DiffAE, decode_codes, stochastic_encode  # noqa: E402

# ------------------------------------------------------------------------------------------------ helpers

TINY_NET = dict(in_channels=1, out_channels=1, image_size=16, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=[8], dropout=0.0, num_head_channels=8, num_heads=0, resblock_updown=True,
                use_scale_shift_norm=True, z_sem_dim=8, num_groups=4)
TINY_ENC = dict(in_channels=1, image_size=16, out_dim=8, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=[8], dropout=0.0, num_head_channels=8, num_heads=0, resblock_updown=True,
                num_groups=4)
TINY_CFG = {"network": TINY_NET, "encoder": TINY_ENC, "diffusion": {"schedule": "linear", "T": 1000},
            "preprocess": {"size": 16, "percentile": 99.0, "clip": True, "image_channels": 1},
            "sample": {"encode_steps": 12, "decode_steps": 6}}


def register_tiny(home: Path, tmp: Path) -> str:
    """A tiny random DiffAE (zero-initialised output layers re-drawn so eps depends on x and z_sem)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = DiffAE(TINY_NET, TINY_ENC)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and float(p.abs().sum()) == 0:
                p.normal_(0, 0.05)
    path = tmp / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return Registry(home, bundled=False).register("tiny", "diffae", {"weights": path}, config=TINY_CFG).ref


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """24 small labelled vertebra images, every row graded, all four grades present."""
    from medcfx.demo import make_demo

    out = tmp_path_factory.mktemp("diffae-data") / "lab"
    make_demo("vertebra", out, cases=24, seed=3, size=32, grade_probs=(0.4, 0.1, 0.3, 0.2), graded_fraction=1.0)
    return out


# ------------------------------------------------------------------------------- latent algebra by hand

def hand_grader(calibration=(1.5, 0.5)) -> Grader:
    plane = Hyperplane(np.array([3.0, 4.0]), -5.0, np.array(calibration, float), (5.0, 0.0))
    return Grader(np.array([1.0, 2.0]), np.array([2.0, 0.5]), {"svm": plane}, {"grade_range": [0, 3]})


def test_reflection_matches_hand_computation():
    g = hand_grader()
    z = np.array([[5.0, 3.0]])
    # w = ((5-1)/2, (3-2)/0.5) = (2, 2); n.w + b = 6 + 8 - 5 = 9; |n| = 5; d = 1.8
    p = g.predict(z)
    assert p["distance"][0] == pytest.approx(1.8)
    # w_ce = w - 2 d n/|n| = (2, 2) - 3.6 (0.6, 0.8) = (-0.16, -0.88); z_ce = (0.68, 1.56)
    np.testing.assert_allclose(g.reflect(z)[0], [0.68, 1.56], atol=1e-12)
    assert g.predict(g.reflect(z))["distance"][0] == pytest.approx(-1.8)
    # calibrated grade 1.5 * 1.8 + 0.5 = 3.2 -> rounded and clipped to the range [0, 3]; P = sigmoid(5 * 1.8)
    assert p["grade"][0] == pytest.approx(3.2)
    assert p["grade_rounded"][0] == 3
    assert p["probability"][0] == pytest.approx(1 / (1 + math.exp(-9.0)))


def test_grade_inversion_matches_hand_computation():
    g = hand_grader()
    z = np.array([[5.0, 3.0]])
    # grade 2 <- d* = (2 - 0.5) / 1.5 = 1; w' = w + (1 - 1.8) (0.6, 0.8) = (1.52, 1.36); z' = (4.04, 2.68)
    np.testing.assert_allclose(g.to_grade(z, 2.0)[0], [4.04, 2.68], atol=1e-12)
    assert g.predict(g.to_grade(z, 2.0))["grade"][0] == pytest.approx(2.0)
    # moving along n keeps the component orthogonal to n: (w' - w) is parallel to n
    dw = g.normalise(g.to_grade(z, 0.0)) - g.normalise(z)
    assert abs(dw[0, 0] * 4.0 - dw[0, 1] * 3.0) < 1e-12


def test_cubic_calibration_inversion():
    # g(d) = 0.1 d^3 + 1.0 d + 1.5: monotone, so every grade has exactly one real root
    g = hand_grader(calibration=(0.1, 0.0, 1.0, 1.5))
    plane = g.plane(None)
    for grade in (0.0, 1.0, 2.0, 3.0):
        d = plane.distance_for_grade(grade)
        assert 0.1 * d**3 + d + 1.5 == pytest.approx(grade, abs=1e-9)


def test_binary_target_rules():
    grades = np.array([0, 1, 2, 3, np.nan, np.nan, np.nan])
    labels = np.array([0, 1, 1, 1, 0, 1, np.nan])
    t = binary_targets(grades, labels, [2, 3], [0], ungraded_positive=False)
    np.testing.assert_array_equal(t, [0, np.nan, 1, 1, 0, np.nan, np.nan])
    t = binary_targets(grades, labels, [1, 2, 3], [0], ungraded_positive=True)
    np.testing.assert_array_equal(t, [0, 1, 1, 1, 0, 1, np.nan])


# ------------------------------------------------------------------------- classifiers vs scikit-learn

SETTINGS = {"label": "", "positive_grades": [2, 3], "negative_grades": [0], "ungraded_positive": False,
            "calibration_grades": [], "degree": 1, "svm_C": 0.5, "logreg_C": 2.0, "class_weight": "balanced"}


def synthetic_codes(n=120, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, 4, n).astype(float)
    z = rng.normal(size=(n, dim)) * np.linspace(0.5, 3, dim) + 4.0
    z[:, 0] += 1.2 * grades  # the grade lives along the first axis
    grades[rng.random(n) < 0.4] = np.nan  # ungraded rows
    labels = np.where(np.isnan(grades), (z[:, 0] > 6).astype(float), (grades >= 1).astype(float))
    return z, grades, labels


def test_hyperplanes_match_scikit_learn_decision_function():
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.svm import LinearSVC

    z, grades, labels = synthetic_codes()
    g = fit_grader(z, grades, labels, SETTINGS)
    w = (z - z.mean(0)) / z.std(0)
    y = binary_targets(grades, labels, [2, 3], [0], False)
    used = np.isfinite(y)
    svm = LinearSVC(C=0.5, class_weight="balanced", max_iter=20000, random_state=0).fit(w[used], y[used].astype(int))
    lr = LogisticRegression(C=2.0, class_weight="balanced", max_iter=5000).fit(w[used], y[used].astype(int))
    for name, clf in (("svm", svm), ("logreg", lr)):
        d = g.predict(z, name)["distance"]
        np.testing.assert_allclose(d, clf.decision_function(w) / np.linalg.norm(clf.coef_), rtol=1e-6, atol=1e-8)
        # calibration = least-squares line from distance to grade on the graded rows
        graded = np.isfinite(grades)
        ref = LinearRegression().fit(d[graded, None], grades[graded])
        np.testing.assert_allclose(g.predict(z, name)["grade"], ref.predict(d[:, None]), rtol=1e-6, atol=1e-8)
    # the logistic regression's probability is its own predict_proba
    np.testing.assert_allclose(g.predict(z, "logreg")["probability"], lr.predict_proba(w)[:, 1], rtol=1e-6)
    assert g.info["counts"] == {"images": 120, "positive": int(np.sum(y == 1)), "negative": int(np.sum(y == 0)),
                                "graded": int(np.isfinite(grades).sum())}


def test_cv_choice_of_C_matches_scikit_learn_and_the_one_se_rule():
    """grader.svm_C = cv: per C of the grid, the mean and standard error of the fold AUROCs equal
    scikit-learn's cross_val_score with the same folds; the chosen C is the smallest within one SE of the best."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from medcfx_diffae.grader import C_GRID, choose_C

    z, grades, labels = synthetic_codes(n=200, dim=12, seed=1)
    y = binary_targets(grades, labels, [2, 3], [0], False)
    used = np.isfinite(y)
    w = ((z - z.mean(0)) / z.std(0))[used]
    yy = y[used].astype(int)
    make = lambda C: LogisticRegression(C=C, class_weight="balanced", max_iter=5000)  # noqa: E731
    C, table = choose_C("cv", make, w, yy, seed=4, what="grader.logreg_C")
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=4)
    ref = []
    for c in C_GRID:
        s = cross_val_score(make(c), w, yy, cv=folds, scoring="roc_auc")
        ref.append([c, s.mean(), s.std(ddof=1) / np.sqrt(len(s))])
    np.testing.assert_allclose(np.array(table), np.array(ref), rtol=1e-9)
    best = max(ref, key=lambda r: r[1])
    assert C == min(c for c, m, _ in ref if m >= best[1] - best[2])
    # a given number is used as it is; anything else is one clear error
    assert choose_C(0.25, make, w, yy, 0, "x") == (0.25, [])
    for bad in ("often", -1, 0):
        with pytest.raises(UsageError, match="positive number or 'cv'"):
            choose_C(bad, make, w, yy, 0, "grader.svm_C")
    # fit_grader records the choice and fits with it
    g = fit_grader(z, grades, labels, {**SETTINGS, "logreg_C": "cv"}, seed=4)
    assert g.info["regularisation"]["logreg"]["C"] == C and g.info["regularisation"]["svm"]["C"] == 0.5
    lr = make(C).fit(((z - z.mean(0)) / z.std(0))[used], yy)
    np.testing.assert_allclose(g.planes["logreg"].normal, lr.coef_[0], rtol=1e-6)


def test_fit_refuses_too_few_labels():
    z, grades, labels = synthetic_codes(n=20)
    grades[:] = 0
    labels[:] = 0
    with pytest.raises(MedcfxError, match="too few labelled samples"):
        fit_grader(z, grades, labels, SETTINGS)


# ----------------------------------------------------------------------------- grader artifact round trip

def test_grader_artifact_round_trip_and_parent(tmp_path):
    from safetensors import safe_open

    z, grades, labels = synthetic_codes()
    g = fit_grader(z, grades, labels, dict(SETTINGS, degree=2))
    reg = Registry(tmp_path / "home", bundled=False)
    ae = reg.register("ae", "diffae", {"weights": _dummy(tmp_path)}, config={})
    paths = g.save(tmp_path)
    entry = reg.register("ae-grader", "diffae-grader", paths, config={}, parent=ae.ref)
    # the artifacts are a safetensors file and a JSON file (nothing pickled)
    stored = reg.artifact_path(entry, "weights")
    with safe_open(str(stored), framework="pt") as fh:
        assert {"mean", "std", "svm.normal", "logreg.calibration"} <= set(fh.keys())
    info = json.loads(reg.artifact_path(entry, "grader").read_text())
    assert info["format"] == "medcfx-diffae-grader" and info["degree"] == 2
    back, e2 = load_grader(reg, "ae-grader")
    assert e2.parent == "ae:1" and reg.resolve(e2.parent).method == "diffae"
    for name in ("svm", "logreg"):
        np.testing.assert_array_equal(back.predict(z, name)["distance"], g.predict(z, name)["distance"])
        np.testing.assert_array_equal(back.to_grade(z, 1.0, name), g.to_grade(z, 1.0, name))
    # a modified artifact is refused
    stored.chmod(0o644)
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError):
        load_grader(reg, "ae-grader")
    with pytest.raises(UsageError, match="not a grader"):
        load_grader(reg, "ae")


def _dummy(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    p = tmp_path / "dummy.safetensors"
    save_file({"a": torch.zeros(1)}, str(p))
    return p


# --------------------------------------------------------------------------- encode -> decode, analytic

class GaussianEps(torch.nn.Module):
    """The exact eps-predictor for data x0 ~ N(m(z), s^2 I) with m(z) = mean of z_sem:
    eps*(x_t) = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a), a = abar_t."""

    def __init__(self, schedule, s):
        super().__init__()
        self.abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float64)
        self.s = s
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x, t, z_sem):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        m = z_sem.mean(dim=1).reshape(-1, 1, 1, 1).to(torch.float64)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * m) / (a * self.s**2 + 1 - a)).to(x.dtype)


def test_encode_decode_inverts_an_analytic_model():
    from types import SimpleNamespace

    from medcfx.diffusion import Schedule

    sched = Schedule.create("linear", 1000)
    s = 0.5
    model = SimpleNamespace(unet=GaussianEps(sched, s))
    g = torch.Generator().manual_seed(0)
    z = torch.full((2, 4), 0.3, dtype=torch.float64)
    x0 = 0.3 + s * torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    x_T = stochastic_encode(model, sched, x0, z, 250)
    # for Gaussian data the probability-flow ODE maps x0 to (x0 - m) / s at the end of the chain, scaled by
    # the noise level: the code is near a standard normal sample, not x0 itself
    assert float((x_T.std() - 1).abs()) < 0.25
    x_rec = decode_codes(model, sched, x_T, z, 100)
    # the paper's 250 / 100 steps: the remaining error is the DDIM discretisation (measured 0.047)
    assert float((x_rec - x0).abs().max()) < 0.06
    # a code with another mean decodes to the same sample shifted by the change of mean (same quantile)
    x_cf = decode_codes(model, sched, x_T, z + 0.4, 100)
    assert float((x_cf - (x0 + 0.4)).abs().max()) < 0.06
    # and the error vanishes as the step count grows (first order: about 4x smaller for 4x the steps)
    errs = [float((decode_codes(model, sched, stochastic_encode(model, sched, x0, z, n), z, n) - x0).abs().max())
            for n in (250, 1000)]
    assert errs[1] < errs[0] / 3 and errs[1] < 0.01


def test_semantic_reliance_is_one_when_z_is_ignored():
    from types import SimpleNamespace

    from medcfx.diffusion import Schedule
    from medcfx_diffae.evaluate import semantic_reliance

    torch.manual_seed(0)
    m = DiffAE(TINY_NET, TINY_ENC).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and float(p.abs().sum()) == 0:
                p.normal_(0, 0.05)
        x = torch.randn(4, 1, 16, 16)
        z = torch.randn(4, 8).numpy()
        loaded = SimpleNamespace(model=m, schedule=Schedule.create("linear", 1000))
        used = semantic_reliance(loaded, x, z)
        assert all(abs(v[2] - 1) > 1e-4 for v in used.values())  # z enters: another code changes eps
        for name, p in m.unet.named_parameters():
            if "z_proj" in name:
                p.zero_()  # h * (1 + Linear(z)) = h: the network now ignores z_sem
        ignored = semantic_reliance(loaded, x, z)
    for t, (own, other, ratio) in ignored.items():
        assert own == pytest.approx(other, rel=1e-6) and ratio == pytest.approx(1.0, rel=1e-6)


def test_code_vs_noise_matches_the_gaussian_closed_form():
    """x0 | z ~ N(m(z), s^2): the decoder is x0 = m(z) + s x_T, so changing the code moves every pixel by
    |m(z_i) - m(z_j)| and changing x_T by s |n - n'| (mean 2 s / sqrt(pi))."""
    from types import SimpleNamespace

    from medcfx.diffusion import Schedule
    from medcfx_diffae.evaluate import code_vs_noise

    sched = Schedule.create("linear", 1000)
    s = 0.5
    loaded = SimpleNamespace(model=SimpleNamespace(unet=GaussianEps(sched, s)), schedule=sched)
    z = np.repeat(np.array([[0.0], [0.4], [0.0], [0.4]]), 4, axis=1)  # m(z) = mean of z: 0, 0.4, 0, 0.4
    out = code_vs_noise(loaded, z, (1, 32, 32), seed=3, steps=500)  # DDIM error ~ 1 / steps (6 % at 50)
    g = torch.Generator().manual_seed(3)
    n, n2 = torch.randn((4, 1, 32, 32), generator=g), torch.randn((4, 1, 32, 32), generator=g)
    assert out["code"] == pytest.approx(0.4, rel=0.03)
    assert out["noise"] == pytest.approx(s * float((n - n2).abs().mean()), rel=0.05)
    assert out["noise"] == pytest.approx(2 * s / np.sqrt(np.pi), rel=0.06)
    assert out["ratio"] == pytest.approx(out["code"] / out["noise"])
    # a code that no longer matters (same mean for every image) moves nothing
    flat = code_vs_noise(loaded, np.full((4, 4), 0.2), (1, 32, 32), seed=3, steps=50)
    assert flat["code"] < 1e-6 and flat["ratio"] < 1e-5


# -------------------------------------------------------------------- encode -> decode, bundled demo

def test_bundled_demo_reconstructs_demo_image():
    from medcfx_diffae.commands import recon_errors
    from medcfx_diffae.model import load_autoencoder, load_input, semantic

    image = ROOT / "models" / "demo-inputs" / "vertebra.png"
    reg = Registry(ROOT / "no-user-home", bundled=ROOT / "registry.yaml")
    if not image.exists() or "diffae-demo" not in {e.name for e in reg.entries()}:
        pytest.skip("the bundled diffae demo model is not in this checkout")
    torch.set_num_threads(1)
    ae = load_autoencoder(reg, "diffae-demo")
    x = torch.from_numpy(load_input(image, ae.preprocess, 1)[None])
    z = semantic(ae.model, x)
    # 100 / 50 steps keep the test short (measured 36.8 dB; the default 250 / 100 steps give 43.4 dB)
    x_T = stochastic_encode(ae.model, ae.schedule, x, z, 100)
    x_rec = decode_codes(ae.model, ae.schedule, x_T, z, 50)
    err = recon_errors(x[0].numpy(), x_rec[0].numpy())
    assert err["psnr_db"] > 32.0, err
    # x_T holds the stochastic details: decoding a fresh Gaussian x_T with the same z_sem is far worse
    # (measured 21.6 dB: the same vertebrae, not the same image)
    x_new = decode_codes(ae.model, ae.schedule, torch.randn(x_T.shape, generator=torch.Generator().manual_seed(0)),
                         z, 50)
    assert recon_errors(x[0].numpy(), x_new[0].numpy())["psnr_db"] < err["psnr_db"] - 10


# ------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory, labelled):
    """A private MEDCFX_HOME holding a tiny autoencoder and its grader, trained with the real CLI."""
    home = tmp_path_factory.mktemp("diffae-home")
    ref = register_tiny(home, home)
    env = cli_env(home)
    run_cli(["train", "diffae-grader", "--model", ref, "--data", labelled, "--name", "tiny-grader"], env=env, check=0)
    return home


@pytest.fixture
def tiny(tiny_home):
    return cli_env(tiny_home)


def test_cli_grade_on_tiny_model(tiny, tiny_home, tmp_path, labelled):
    from medcfx_diffae.model import load_autoencoder, load_input, semantic

    image = labelled / "images" / "vert_00001.png"
    proc = run_cli(["grade", image, "--model", "tiny-grader", "--out", tmp_path / "out", "--grades", "0,3"],
                   env=tiny, check=0)
    assert "grade" in proc.stdout and "distance" in proc.stdout
    folder = tmp_path / "out" / "vert_00001"
    for name in ("strip.png", "counterfactual.png", "grade_0.png", "grade_3.png", "diff_grade_3.png",
                 "provenance.json", "result.json"):
        assert (folder / name).is_file(), name
    result = json.loads((folder / "result.json").read_text())
    # the printed numbers are the grader's on the input's z_sem, recomputed here in-process
    reg = Registry(tiny_home, bundled=False)
    grader, gentry = load_grader(reg, "tiny-grader")
    assert gentry.parent == "tiny:1"
    ae = load_autoencoder(reg, gentry.parent)
    z = semantic(ae.model, torch.from_numpy(load_input(image, ae.preprocess, 1)[None])).numpy()
    p = grader.predict(z.astype(np.float64))
    assert result["distance"] == pytest.approx(float(p["distance"][0]), rel=1e-4, abs=1e-5)
    assert result["grade"] == pytest.approx(float(p["grade"][0]), rel=1e-4, abs=1e-5)
    assert result["frames"]["counterfactual"]["distance"] == pytest.approx(-result["distance"], rel=1e-6)
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["model"] == "tiny-grader:1" and prov["autoencoder"] == "tiny:1"


def test_cli_explain_reconstruct_and_evaluate(tiny, tmp_path, labelled):
    image = labelled / "images" / "vert_00002.png"
    proc = run_cli(["explain", image, "--method", "diffae", "--model", "tiny", "--reconstruct",
                    "--out", tmp_path / "ex"], env=tiny, check=0)
    assert "reconstruction MSE" in proc.stdout
    assert (tmp_path / "ex" / "vert_00002" / "reconstruction.png").is_file()
    run_cli(["evaluate", "diffae", "--model", "tiny-grader", "--data", labelled, "--out", tmp_path / "ev",
             "--baseline-steps", "5", "--recon-images", "2"], env=tiny, check=0)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert [r["classifier"] for r in metrics["rows"]] == ["SVM", "LR", "CNN"]
    assert 0.0 <= metrics["rows"][0]["detection_AUROC"] <= 1.0
    from medcfx_diffae.grader import C_GRID

    assert metrics["rows"][0]["C"] in C_GRID and metrics["rows"][1]["C"] in C_GRID  # the grader's cv choice
    assert "| DAE | SVM |" in (tmp_path / "ev" / "metrics.md").read_text()
    assert set(metrics["semantic_reliance"]) == {"100", "300", "500"}
    cvn = metrics["code_vs_noise"]
    assert cvn["ratio"] == pytest.approx(cvn["code"] / cvn["noise"]) and cvn["noise"] > 0
    assert "What decides a decoded image" in (tmp_path / "ev" / "metrics.md").read_text()


def test_cli_bad_inputs_one_line_nonzero(tiny, tmp_path):
    from PIL import Image

    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(rgb)
    nan = tmp_path / "nan.npy"
    a = np.zeros((16, 16), np.float32)
    a[2, 3] = np.nan
    np.save(nan, a)
    out = tmp_path / "bad"
    tiny_png = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tiny_png)
    cases = [(["grade", tiny_png, "--model", "tiny-grader"], "3 x 3 pixels; medcfx needs at least 16 x 16"),
             (["grade", nan, "--model", "tiny-grader"], "NaN"),
             (["grade", rgb, "--model", "no-such-model"], "unknown model 'no-such-model'"),
             (["grade", rgb, "--model", "tiny"], "cannot grade")]
    for args, message in cases:
        proc = run_cli([*args, "--out", out], env=tiny)
        assert proc.returncode != 0
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()  # nothing half-written


@pytest.mark.slow
def test_cli_grade_default_bundled_demo(home, tmp_path):
    image = ROOT / "models" / "demo-inputs" / "vertebra.png"
    if not image.exists():
        pytest.skip("no bundled demo input")
    proc = run_cli(["grade", image, "--out", tmp_path / "g"], env=cli_env(home), check=0)
    out = tmp_path / "g" / "vertebra"
    assert "diffae-grader-demo" in (out / "provenance.json").read_text()
    result = json.loads((out / "result.json").read_text())
    assert f"grade {result['grade']:.2f}" in proc.stdout
    # the bundled demo's counterfactuals show something: re-encoded, the frames for G0, G1, G2 climb along
    # the normal (the input, a G3 crush fracture, sits near G2-G3, where the frames level off), the reflection
    # lands on the other side of the hyperplane, and the frames differ from the input far more than the
    # reconstruction does (measured: 7.5x for G0, 3.6x for G3, 9x for the reflection)
    frames = result["frames"]
    d = [frames[f"grade_{g}"]["score"]["distance"] for g in range(4)]
    assert d[0] < d[1] < d[2] and d[3] > d[1], d
    assert np.sign(frames["counterfactual"]["score"]["distance"]) == -np.sign(result["distance"])
    from PIL import Image

    px = {n: np.asarray(Image.open(out / f"{n}.png"), np.float64)
          for n in ("input", "reconstruction", "grade_0", "grade_3", "counterfactual")}
    rec = np.abs(px["reconstruction"] - px["input"]).mean()
    for n, factor in (("grade_0", 4), ("counterfactual", 4), ("grade_3", 2)):
        assert np.abs(px[n] - px["input"]).mean() > factor * rec, n
