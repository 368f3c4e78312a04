"""The mediffusion commands as a user runs them: real subprocesses, real PNGs and labels.csv, tiny models
registered in a private MEDCFX_HOME by the test itself (no minutes of training)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import cli_env, run_cli
from medcfx.registry import Registry

FINDINGS = ["cardiomegaly", "effusion"]
AE_NET = {"in_channels": 1, "latent_channels": 2, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
          "num_groups": 4}
UNET = {"in_channels": 2, "out_channels": 2, "image_size": 8, "model_channels": 8, "channel_mult": [1, 2],
        "num_res_blocks": 1, "attention_resolutions": [4], "dropout": 0.0, "num_head_channels": 8, "num_groups": 4}
TINY_TRAIN = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.log_every=1"]


def _write_dataset(root, n=12, size=24):
    """n grey PNGs (24x24, so preprocessing resizes them to 16) and a labels.csv with empty cells."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = (rng.random((size, size)) * 80).astype(np.uint8)
        lab = [int(i % 2 == 0), int(i % 3 == 0)]
        if lab[0]:
            img[6:18, 6:18] += 120
        name = f"images/img_{i:02d}.png"
        Image.fromarray(img).save(root / name)
        if i >= 8:  # unlabelled rows
            rows.append([name, "", "", "", "", ""])
        else:
            rows.append([name, *lab, "6;6;18;18" if lab[0] else "", "", f"{i / 10:.1f}"])
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", *FINDINGS, "bbox_cardiomegaly", "bbox_effusion", "meta_note"])
        w.writerows(rows)
    return root


@pytest.fixture
def data(tmp_path):
    return _write_dataset(tmp_path / "chest")


@pytest.fixture
def models(home, tmp_path):
    """A random tiny autoencoder and joint model, registered as mediffusion-ae:1 and mediffusion:1."""
    from medcfx_mediffusion.autoencoder import KLAutoencoder
    from medcfx_mediffusion.joint import build_joint

    torch.manual_seed(0)
    ae = KLAutoencoder(AE_NET)
    joint = build_joint(UNET, {"hidden": 8, "pool": 2}, len(FINDINGS))
    for p in joint.parameters():  # random (not zero-initialised) output layers, so guidance changes something
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    files = tmp_path / "weights"
    files.mkdir()
    paths = {}
    for role, module in {"ae": ae, "weights": joint.unet, "head": joint.head}.items():
        paths[role] = files / f"{role}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(paths[role]))
    pp = {"size": 16, "modalities": ["t1", "t1ce", "t2", "flair"], "percentile": 99.0, "clip": True, "axis": 2,
          "min_foreground": 0.05, "image_channels": 1, "intensity": "percentile"}
    reg = Registry(home, bundled=False)
    ae_cfg = {"network": AE_NET, "preprocess": pp, "scale_factor": 1.0, "latent_size": 8}
    reg.register("mediffusion-ae", "mediffusion-ae", {"weights": paths["ae"]}, config=ae_cfg)
    cfg = {"network": UNET, "classifier": {"hidden": 8, "dropout": 0.0, "pool": 2, "findings": FINDINGS, "kind": "bce",
                                           "pos_weight": [1.0, 1.0]},
           "diffusion": {"schedule": "linear", "T": 1000}, "preprocess": pp,
           "ae": {**ae_cfg, "ref": "mediffusion-ae:1", "sha256": "0" * 64}}
    reg.register("mediffusion", "mediffusion", {"weights": paths["weights"], "head": paths["head"], "ae": paths["ae"]},
                 config=cfg)
    return {"ae": ae, "joint": joint, "pp": pp}


def _env(home):
    return cli_env(home, MEDCFX_PLUGINS="mediffusion")


def _reference_probs(models, png):
    """Probabilities computed here along another path: full UNet forward_features + pooling + head."""
    from medcfx.data import PreprocessConfig
    from medcfx_mediffusion.data import read_input

    x, _ = read_input(png, PreprocessConfig.from_dict(models["pp"]), 1)
    with torch.no_grad():
        z = models["ae"].encoder(x)[0]
        _, feats = models["joint"].unet.forward_features(z, torch.zeros(1, dtype=torch.int64))
        h = torch.cat([torch.nn.functional.adaptive_avg_pool2d(f, 2).flatten(1) for f in feats], 1)
        return torch.sigmoid(models["joint"].head(h))[0].numpy()


def test_explain_with_several_targets_writes_counterfactual_map_panel_and_provenance(home, models, data, tmp_path):
    out = tmp_path / "out"
    png = data / "images" / "img_00.png"
    run_cli(["explain", png, data / "images" / "img_03.png", "--method", "mediffusion",
             "--target", "no-cardiomegaly,effusion", "--steps", "5", "--out", out], env=_env(home), check=0)
    folder = out / "img_00"
    assert sorted(p.name for p in folder.iterdir()) == ["counterfactual.png", "heatmap.png", "panel.png", "provenance.json"]
    assert Image.open(folder / "counterfactual.png").size == (24, 24)  # back on the input's grid
    assert Image.open(folder / "heatmap.png").mode == "RGB"
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["params"]["targets"] == ["no-cardiomegaly", "effusion"]
    assert prov["params"]["t"] == 300 and prov["params"]["scales"] == [500.0, 200.0]  # paper defaults
    assert prov["model"] == "mediffusion:1" and prov["inputs"][0]["path"].endswith("img_00.png")
    before = [prov["probabilities"][f]["before"] for f in FINDINGS]
    np.testing.assert_allclose(before, _reference_probs(models, png), rtol=1e-4, atol=1e-5)
    assert (out / "img_03" / "panel.png").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_explain_unknown_target_is_a_one_line_error_and_writes_nothing(home, models, data, tmp_path):
    out = tmp_path / "out"
    p = run_cli(["explain", data / "images" / "img_00.png", "--method", "mediffusion", "--target", "no-pneumonia",
                 "--out", out], env=_env(home))
    assert p.returncode == 2
    notes = [ln for ln in p.stderr.splitlines() if ln.startswith("using ")]  # the model picked without --model
    assert notes == ["using mediffusion:1"]
    err = "\n".join(ln for ln in p.stderr.strip().splitlines() if not ln.startswith("using "))
    assert "unknown target 'no-pneumonia'" in err and "no-cardiomegaly" in err and "effusion" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in p.stderr
    assert not out.exists() or not any(out.iterdir())
    p = run_cli(["explain", data / "images" / "img_00.png", "--method", "mediffusion", "--out", out], env=_env(home))
    assert p.returncode == 2 and "--target is required" in p.stderr


def test_predict_and_evaluate_report_per_finding_probabilities_and_auroc(home, models, data, tmp_path):
    from sklearn.metrics import roc_auc_score

    pngs = sorted((data / "images").glob("*.png"))
    run_cli(["predict", *pngs, "--model", "mediffusion", "--out", tmp_path / "pred"], env=_env(home), check=0)
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(pngs) and set(rows[0]) == {"file", *FINDINGS}
    probs = np.array([[float(r[f]) for f in FINDINGS] for r in rows])
    np.testing.assert_allclose(probs[0], _reference_probs(models, pngs[0]), rtol=1e-4, atol=1e-5)
    run_cli(["evaluate", "mediffusion", "--model", "mediffusion", "--data", data, "--out", tmp_path / "ev",
             "--cf-images", "0"],  # the counterfactual checks are tested in test_cf_quality_mediffusion.py
            env=_env(home), check=0)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["images"] == 12
    labels = {f"images/img_{i:02d}.png": (int(i % 2 == 0), int(i % 3 == 0)) for i in range(8)}
    for k, f in enumerate(FINDINGS):
        idx = [j for j, r in enumerate(rows) if r["file"].split("chest/")[-1] in labels]
        y = [labels[rows[j]["file"].split("chest/")[-1]][k] for j in idx]
        assert m[f"{f}_AUROC"] == pytest.approx(roc_auc_score(y, probs[idx, k]), abs=1e-4)
    assert "| mean |" in (tmp_path / "ev" / "metrics.md").read_text()


def test_sample_with_guidance_writes_images_and_probabilities(home, models, tmp_path):
    out = tmp_path / "samples"
    run_cli(["sample", "--method", "mediffusion", "--target", "cardiomegaly", "-n", "3", "--steps", "4",
             "--out", out], env=_env(home), check=0)
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "sample_000.png", "sample_001.png",
                                                     "sample_002.png", "samples.png"]
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["probabilities"]) == 3 and prov["params"]["targets"] == ["cardiomegaly"]
    assert Image.open(out / "sample_000.png").size == (16, 16)


@pytest.mark.slow
def test_train_autoencoder_then_joint_model_with_a_label_fraction(home, data, tmp_path):
    env = _env(home)
    ae_net = ["--set", "network.base_channels=8", "--set", "network.channel_mult=[1,2]", "--set", "network.num_groups=4",
              "--set", "network.latent_channels=2", "--set", "preprocess.size=16"]
    p = run_cli(["train", "mediffusion-ae", "--data", data, *TINY_TRAIN, *ae_net, "--runs-dir", tmp_path / "runs"],
                env=env, check=0)
    assert "reconstruction on" in p.stdout
    p = run_cli(["train", "mediffusion", "--data", data, "--label-fraction", "0.5", "--ae", "mediffusion-ae",
                 *TINY_TRAIN, "--set", "classifier.class_batch=2", "--set", "classifier.cls_start=0",
                 "--set", "network.model_channels=8", "--set", "network.num_groups=4", "--set", "network.num_head_channels=8",
                 "--set", "network.channel_mult=[1,2]", "--runs-dir", tmp_path / "runs"], env=env, check=0)
    reg = Registry(home, bundled=False)
    ae, joint = reg.resolve("mediffusion-ae"), reg.resolve("mediffusion")
    assert set(ae.metrics) >= {"recon_MAE", "recon_PSNR", "recon_SSIM"}
    assert set(joint.artifacts) == {"weights", "head", "ae"}
    assert joint.artifacts["ae"]["sha256"] == ae.digest and joint.config["ae"]["ref"] == ae.ref
    assert joint.config["classifier"]["findings"] == FINDINGS
    assert joint.metrics["labelled_images"] == 4  # round(0.5 * 8 labelled images)
    assert joint.config["network"]["image_size"] == 8 and joint.config["network"]["in_channels"] == 2
    p = run_cli(["train", "mediffusion", "--data", data, "--ae", "nope"], env=env)
    assert p.returncode == 1 and "train mediffusion-ae" in p.stderr


def test_single_inputs_are_scaled_exactly_like_the_training_set(home, data):
    from medcfx.data import PreprocessConfig, prepare
    from medcfx_mediffusion.data import read_input

    pp = PreprocessConfig(size=16, image_channels=1)
    ss = prepare(data, pp)
    i = list(ss.case_ids).index("images/img_05.png")
    x, geom = read_input(data / "images" / "img_05.png", pp, 1)
    np.testing.assert_allclose(x[0].numpy(), np.asarray(ss.images[i]), atol=1e-6)
    assert geom.shape == (24, 24)
