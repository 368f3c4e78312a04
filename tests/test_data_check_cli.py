"""medcfx.data.check and the ``medcfx data`` commands: every problem listed at once, exit codes, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import cli_env, run_cli
from test_data_helpers import affine_for, truncate_gzip, write_brats, write_brats_case, write_nii, write_png
from typer.testing import CliRunner

from medcfx.data.check import check
from medcfx.data.cli import data_app
from medcfx.errors import MedcfxError

runner = CliRunner()


def _broken_brats(root):
    """Six cases, five of them broken in a different way each, plus one healthy case without lesion."""
    write_brats(root, n=7)
    # 1: missing modality
    (root / "BraTS_001" / "BraTS_001_t2.nii.gz").unlink()
    # 2: NaN
    f = root / "BraTS_002" / "BraTS_002_t1.nii.gz"
    d = nib.load(str(f)).get_fdata().astype(np.float32)
    d[1, 1, 1] = np.nan
    write_nii(f, d)
    # 3: 4D file
    write_nii(root / "BraTS_003" / "BraTS_003_flair.nii.gz", np.ones((24, 20, 12, 2), np.float32))
    # 4: shape mismatch between modalities
    write_nii(root / "BraTS_004" / "BraTS_004_t1ce.nii.gz", np.ones((24, 20, 10), np.float32))
    # 5: truncated gzip
    truncate_gzip(root / "BraTS_005" / "BraTS_005_t2.nii.gz", 0.5)
    # 6: a case without any lesion: info, not a problem
    write_nii(root / "BraTS_006" / "BraTS_006_seg.nii.gz", np.zeros((24, 20, 12), np.uint8), affine_for(6))
    return root


def test_check_lists_every_problem_at_once(tmp_path):
    root = _broken_brats(tmp_path / "b")
    r = check(root)
    assert r.kind == "brats" and not r.ok
    text = "\n".join(r.problems)
    assert "BraTS_001 is missing modality t2" in text
    assert "BraTS_002_t1.nii.gz: holds 1 NaN" in text
    assert "BraTS_003_flair.nii.gz: expected a 3D volume, got shape (24, 20, 12, 2) (4D" in text
    assert "case BraTS_004: t1ce (BraTS_004_t1ce.nii.gz) is not on the grid of t1" in text and "(24, 20, 10)" in text
    assert "cannot read" in text and "BraTS_005_t2.nii.gz" in text
    assert len(r.problems) == 5, r.problems
    assert any("BraTS_006" in i and "without any lesion" in i for i in r.info)
    assert r.spacings and "1.2x0.9x2" in r.spacings
    assert r.label_counts["cases"]["without lesion"] == 1


def test_check_clean_brats(tmp_path):
    r = check(write_brats(tmp_path / "b", n=2))
    assert r.ok and r.cases == 2 and r.shapes == {"24x20x12": 2} and r.files == 10
    assert r.label_counts["cases"]["with lesion"] == 2


def test_check_images_all_problems(tmp_path):
    rng = np.random.default_rng(0)
    write_png(tmp_path / "normal" / "n.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    write_png(tmp_path / "abnormal" / "a.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    write_png(tmp_path / "abnormal" / "b.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    write_png(tmp_path / "abnormal" / "c.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((8, 8), np.uint8))  # empty mask: a problem
    write_png(tmp_path / "masks" / "b.png", np.ones((9, 8), np.uint8))  # wrong size
    (tmp_path / "abnormal" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # unreadable
    r = check(tmp_path)
    text = "\n".join(r.problems)
    assert "masks/a.png: mask is empty (all zero) for abnormal image a.png" in text
    assert "masks/b.png: mask shape (9, 8) does not match" in text
    assert "cannot read" in text and "c.png" in text
    assert len(r.problems) == 3
    assert r.label_counts["abnormal"] == {"positive": 3, "negative": 1, "unlabelled": 0}


def test_check_csv_missing_files_and_empty_folder(tmp_path):
    write_png(tmp_path / "d" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "d" / "labels.csv").write_text("file,x\na.png,1\nb.png,0\nc.png,\n")
    r = check(tmp_path / "d")
    assert len(r.problems) == 2 and all("not found" in p for p in r.problems)
    (tmp_path / "e").mkdir()
    r = check(tmp_path / "e")
    assert r.problems == [f"{tmp_path / 'e'}: folder is empty"]


def test_check_npz(tmp_path):
    imgs = np.random.default_rng(0).random((4, 5, 5)).astype(np.float32)
    imgs[2, 1, 1] = np.nan
    np.savez(tmp_path / "a.npz", train_images=imgs, train_labels=np.array([[0], [1], [0], [1]]))
    r = check(tmp_path / "a.npz")
    assert r.problems == [f"{tmp_path / 'a.npz'}: train_images[2] holds NaN or inf values"]


def test_cli_check_json_and_exit_codes(tmp_path):
    root = _broken_brats(tmp_path / "b")
    res = runner.invoke(data_app, ["check", str(root), "--json"])
    assert res.exit_code == 1 and isinstance(res.exception, MedcfxError) and "5 problem(s) found" in str(res.exception)
    data = json.loads(res.stdout)
    assert data["ok"] is False and len(data["problems"]) == 5
    good = write_brats(tmp_path / "g", n=1)
    res = runner.invoke(data_app, ["check", str(good)])
    assert res.exit_code == 0 and "no problems found" in res.stdout
    res = runner.invoke(data_app, ["check", str(root)], env={"COLUMNS": "250"})
    assert res.exit_code == 1 and res.stdout.count("problem ") == 5


def test_cli_prepare_with_yaml_and_flags(tmp_path, home):
    root = write_brats(tmp_path / "b", n=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preprocess:\n  size: 16\n  percentile: 98\n")
    res = runner.invoke(data_app, ["prepare", str(root), "-c", str(cfg), "--modalities", "flair,t1", "--size", "8", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["channels"] == ["flair", "t1"] and out["size"] == 8 and out["cases"] == 2
    assert out["cache"].startswith(str(home / "cache"))
    idx = json.loads((Path(out["cache"]) / "index.json").read_text())
    assert idx["config"]["percentile"] == 98.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("sise: 3\n")
    res = runner.invoke(data_app, ["prepare", str(root), "-c", str(bad)])
    assert isinstance(res.exception, MedcfxError) and "unknown preprocess key(s) sise" in str(res.exception)


def test_real_cli_one_line_errors_and_prepare(tmp_path, home):
    env = cli_env(home)
    (tmp_path / "empty").mkdir()
    p = run_cli(["data", "prepare", tmp_path / "empty"], env=env)
    assert p.returncode == 1 and "folder is empty" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    root = tmp_path / "b"
    write_brats_case(root, "X1")
    p = run_cli(["data", "prepare", root, "--size", "8"], env=env, check=0)
    assert "slices" in p.stdout and str(home / "cache") in p.stdout.replace("\n", "")
    p = run_cli(["data", "check", root], env=env, check=0)
    assert "no problems found" in p.stdout
    (root / "X1" / "X1_t2.nii.gz").unlink()
    p = run_cli(["data", "check", root, "--json"], env=env, check=1)
    assert json.loads(p.stdout)["problems"] and "1 problem(s) found" in p.stderr


def test_cli_demo_calls_make_demo(tmp_path, monkeypatch):
    import medcfx.demo as demo

    calls = []

    def fake(kind, out, cases=None, seed=0, **opts):
        calls.append((kind, str(out), cases, seed, opts))
        return out

    monkeypatch.setattr(demo, "make_demo", fake)
    res = runner.invoke(data_app, ["demo", "vertebra", "--out", str(tmp_path / "v"), "--cases", "5", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert calls == [("vertebra", str(tmp_path / "v"), 5, 3, {})]
    res = runner.invoke(data_app, ["demo", "knee", "--out", str(tmp_path / "k")])
    assert isinstance(res.exception, MedcfxError) and "unknown demo kind 'knee'" in str(res.exception)


def test_cli_prepare_kind_option(tmp_path, home):
    write_png(tmp_path / "d" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "d" / "labels.csv").write_text("file,x\na.png,1\n")
    write_png(tmp_path / "d" / "normal" / "n.png", np.zeros((4, 4), np.uint8))  # would also look like a folder layout
    res = runner.invoke(data_app, ["prepare", str(tmp_path / "d"), "--kind", "folder", "--size", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "folder" and out["slices"] == 1
    res = runner.invoke(data_app, ["prepare", str(tmp_path / "d"), "--size", "4", "--json"])
    assert json.loads(res.stdout)["kind"] == "csv"


def test_cli_json_is_not_wrapped_on_narrow_terminals(tmp_path):
    deep = tmp_path / ("x" * 80) / ("y" * 80)
    write_brats(deep, n=1)
    (deep / "BraTS_000" / "BraTS_000_t1.nii.gz").unlink()
    res = runner.invoke(data_app, ["check", str(deep), "--json"], env={"COLUMNS": "40"})
    assert json.loads(res.stdout)["problems"][0].startswith(str(deep))
