"""Issue 20, items 2 and 3: outputs that do not collide, and small things a newcomer sees.

Default output folders per method and model; the ONNX export of a bundled model in one command; the two
"exports" named apart; `models list` never cutting a reference; `--version` / `--help` without torch;
`data demo` progress; medcfx-demo/ ignored by git; the nnU-Net reader as docs/data.md describes it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import write_nii

from conftest import ROOT, cli_env, run_cli

# ------------------------------------------------------------------ default output folders


def test_default_output_folders_differ_per_method_and_model(home):
    from medcfx.cli import default_out
    from medcfx.plugins import get_plugins
    from medcfx.registry import Registry

    plugins, reg = get_plugins(), Registry(home)
    base = Path("medcfx-out")
    got = {(m, model): default_out(base, plugins.method(m), reg, model)
           for m, model in (("sanchez", "sanchez-demo"), ("restoration", "restoration-demo"),
                            ("threshold", None), ("cdpm-healthy", None))}
    assert got[("sanchez", "sanchez-demo")] == base / "sanchez-sanchez-demo-v1"
    assert got[("restoration", "restoration-demo")] == base / "restoration-restoration-demo-v2"
    assert got[("threshold", None)] == base / "threshold"
    assert len(set(got.values())) == len(got)


def _register_toy_models(home, toy_site, n: int) -> None:
    """n toy models (random weights, no training) in the private store."""
    import torch
    from safetensors.torch import save_file

    from medcfx.nn import UNet
    from medcfx.registry import Registry

    sys.path.insert(0, str(toy_site))
    try:
        from medcfx_toy import NETWORK
    finally:
        sys.path.remove(str(toy_site))
    reg = Registry(home, bundled=False)
    for i in range(n):
        torch.manual_seed(i)
        model = UNet.from_config(NETWORK)
        with torch.no_grad():  # the output layer starts at zero: every model would predict the same
            for p in model.parameters():
                p.normal_(0, 0.05)
        path = home / f"toy{i}.safetensors"
        save_file(model.state_dict(), str(path))
        reg.register("toy", "toy", {"weights": path}, config={"network": NETWORK,
                                                              "diffusion": {"schedule": "linear", "T": 100}})


def test_two_models_without_out_write_into_two_folders(home, toy_site, tmp_path):
    _register_toy_models(home, toy_site, 2)
    env = cli_env(home, toy_site)
    for version in (1, 2):
        proc = run_cli(["sample", "--model", f"toy:{version}", "-n", "1", "--steps", "ddim2", "--device", "cpu"],
                       env=env, cwd=tmp_path, check=0)
        folder = Path("medcfx-samples") / f"toy-toy-v{version}"
        assert f"--out not given: writing to {folder}" in proc.stderr
        assert (tmp_path / folder / "samples.npy").is_file()
    a, b = (np.load(tmp_path / "medcfx-samples" / f"toy-toy-v{v}" / "samples.npy") for v in (1, 2))
    assert not np.array_equal(a, b)  # each model's output is its own, none overwrote the other


def test_explain_without_out_writes_under_the_methods_own_folder(home, tmp_path):
    env = cli_env(home)
    case = ROOT / "models" / "demo-inputs" / "brain" / "demo_case"
    proc = run_cli(["explain", case, "--method", "threshold", "--slice", "6"], env=env, cwd=tmp_path, check=0)
    assert "writing to medcfx-out/threshold" in proc.stderr
    assert (tmp_path / "medcfx-out" / "threshold" / "demo_case").is_dir()
    assert sorted(p.name for p in (tmp_path / "medcfx-out").iterdir()) == ["threshold"]


# ------------------------------------------------------------------ ONNX export of a bundled model


def test_onnx_export_of_the_bundled_demo_model_is_one_command(home):
    env = cli_env(home)
    bundled = json.loads(run_cli(["models", "show", "sanchez-demo:1", "--json"], env=env, check=0).stdout)
    proc = run_cli(["export", "sanchez-demo", "--format", "onnx"], env=env, check=0)
    said = [ln for ln in proc.stdout.splitlines() if "is bundled (read-only)" in ln]
    assert len(said) == 1 and "sanchez-demo:2" in said[0] and str(home) in said[0], proc.stdout
    copy = json.loads(run_cli(["models", "show", "sanchez-demo", "--json"], env=env, check=0).stdout)
    assert copy["version"] == 2 and copy["bundled"] is False and copy["parent"] == "sanchez-demo:1"
    assert copy["digest"] == bundled["digest"] and "onnx" in copy["artifacts"]
    assert copy["artifacts"]["weights"]["sha256"] == bundled["artifacts"]["weights"]["sha256"]
    assert copy["export"]["parity"]["per_call_max_abs"] < 1e-4
    run_cli(["models", "verify", "sanchez-demo:2"], env=env, check=0)


def test_a_second_copy_of_a_bundled_model_reuses_the_first(home):
    from medcfx.export import store_copy
    from medcfx.registry import Registry

    reg = Registry(home)
    bundled = reg.resolve("restoration-demo:2")
    first = store_copy(reg, bundled)
    assert first.ref == "restoration-demo:3" and not first.bundled and first.parent == bundled.ref
    assert store_copy(reg, bundled).ref == first.ref
    assert [e.ref for e in reg.entries() if e.name == "restoration-demo"] == ["restoration-demo:2", "restoration-demo:3"]


def test_the_two_exports_are_named_apart_and_pack_is_an_alias(home, toy_site, tmp_path):
    env = cli_env(home)
    root_help = run_cli(["--help"], env=env, check=0).stdout
    line = next(ln for ln in root_help.splitlines() if re.search(r"^\W*export\b", ln))
    assert "ONNX" in line and "archive" not in line
    models_help = run_cli(["models", "--help"], env=env, check=0).stdout
    rows = {m.group(1): ln for ln in models_help.splitlines() if (m := re.search(r"^\W*(export|pack)\s", ln))}
    assert set(rows) == {"export", "pack"} and "archive" in rows["export"] and "ONNX" not in rows["export"]
    _register_toy_models(home, toy_site, 1)
    proc = run_cli(["models", "pack", "toy:1", tmp_path / "toy.tar"], env=env, check=0)
    assert proc.stdout.startswith("packed toy:1 into")
    other = tmp_path / "other-home"
    other.mkdir()
    run_cli(["models", "import", tmp_path / "toy.tar"], env=cli_env(other), check=0)


# ------------------------------------------------------------------ models list at 80 columns


def test_models_list_never_cuts_a_reference(home, tmp_path):
    from medcfx.registry import Registry

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"w")
    reg = Registry(home)

    def check(columns: str) -> str:
        out = run_cli(["models", "list"], env=cli_env(home, COLUMNS=columns), check=0).stdout
        words = {w for ln in out.splitlines() for w in ln.split()}
        for ref in (e.ref for e in reg.entries()):
            assert ref in words, (columns, ref, out)
        return out

    for name in ("a-model-name-of-forty-characters-exactly", "short"):
        reg.register(name, "sanchez", {"weights": weights}, metrics={"val_pixel_AUPRC": 0.123456})
    out = check("80")
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    # other columns give way first: the method and the bundled mark stay at 80 columns
    assert rows["a-model-name-of-forty-characters-exactly:1"].split()[1] == "sanchez"
    assert rows["sanchez-demo:1"].split()[-1] == "bundled"
    assert check("200").splitlines()[0].split() == ["ref", "method", "digest", "size", "created", "key", "metric"]
    for name in ("b" * 70, "c" * 95):  # longer than the terminal: still whole
        reg.register(name, "sanchez", {"weights": weights})
    for columns in ("80", "60", "200"):
        check(columns)


# ------------------------------------------------------------------ --version / --help without torch


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["-V"]])
def test_version_and_help_do_not_import_torch(home, args):
    code = ("import sys\nfrom medcfx.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n" % args)
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(home), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH", proc.stdout
    if args != ["--help"]:
        import medcfx

        assert proc.stdout.splitlines()[0] == f"medcfx {medcfx.__version__}"


# ------------------------------------------------------------------ data demo progress


def test_data_demo_says_what_it_writes_and_when_it_is_done(home, tmp_path):
    out = tmp_path / "vert"
    proc = run_cli(["data", "demo", "vertebra", "--out", out, "--cases", "12"], env=cli_env(home), check=0)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"writing 12 vertebra demo cases to {out}")
    assert re.fullmatch(rf"wrote 12 vertebra demo cases to {re.escape(str(out))} in [\d.]+ s", lines[-1])
    assert len(list((out / "images").iterdir())) == 12


def test_demo_progress_counts_cases_in_this_process_staging_folder(tmp_path):
    from medcfx import staging
    from medcfx.data.cli import _cases_written

    out = tmp_path / "brain"
    tmp = staging.staging_path(out)  # this process's staging name, as the demo writers use it
    for i in range(3):
        (tmp / f"demo_{i:05d}").mkdir(parents=True)
    assert _cases_written(out) == 2  # the last folder is the case being written
    other = tmp_path / f"{staging.PREFIX}{os.getpid() + 1}-00000000-00000000-brain"  # another process's
    (other / "x").mkdir(parents=True)
    assert _cases_written(out) == 2
    img = staging.staging_path(tmp_path / "vert") / "images"
    img.mkdir(parents=True)
    for i in range(5):
        (img / f"vert_{i:05d}.png").write_bytes(b"")
    assert _cases_written(tmp_path / "vert") == 5


def test_demo_output_folder_is_ignored_by_git():
    lines = {ln.strip() for ln in (ROOT / ".gitignore").read_text().splitlines()}
    assert {"medcfx-demo/", "medcfx-out/", "medcfx-eval/", "medcfx-samples/"} <= lines


# ------------------------------------------------------------------ the nnU-Net reader, as documented


def _documented_dataset_json() -> dict:
    """The dataset.json of the example in docs/data.md (the JSON written after 'dataset.json')."""
    text = (ROOT / "docs" / "data.md").read_text()
    section = text[text.index("### nnU-Net raw datasets"):]
    block = section[section.index("```"):]
    start = block.index("dataset.json") + len("dataset.json")
    return json.loads(" ".join(block[start:block.index("imagesTr/")].split()))


def test_the_nnunet_example_of_the_docs_reads_as_described(tmp_path):
    from medcfx.data.layouts import detect_layout
    from medcfx.data.preprocess import PreprocessConfig, prepare

    meta = _documented_dataset_json()
    assert set(meta) >= {"channel_names", "file_ending"}
    root = tmp_path / "Dataset501_Brain"
    (root / "imagesTr").mkdir(parents=True)
    # channel numbers in an order other than medcfx's: the names decide
    meta["channel_names"] = {"0": "FLAIR", "1": "T1", "2": "T2", "3": "T1Gd"}
    (root / "dataset.json").write_text(json.dumps(meta))
    shape = (24, 24, 6)
    yy, xx = np.mgrid[0:24, 0:24]
    head = ((yy - 12) ** 2 + (xx - 12) ** 2 < 100) * (1.0 + xx / 24.0)  # some contrast inside the head
    for c in ("brain_001", "brain_002"):
        for i in range(4):
            write_nii(root / "imagesTr" / f"{c}_{i:04d}{meta['file_ending']}",
                      np.repeat(head[:, :, None] * (i + 1) * 100, shape[2], axis=2).astype(np.float32))
    seg = np.zeros(shape, np.uint8)
    seg[10:13, 10:13, 2] = 1  # a lesion on slice 2 only
    write_nii(root / "labelsTr" / f"brain_001{meta['file_ending']}", seg)
    (root / "imagesTr" / "notes.txt").write_text("x")  # a stray file: a problem naming it
    lay = detect_layout(root)
    assert lay.kind == "nnunet" and lay.channels == ["t1", "t1ce", "t2", "flair"]
    assert [p.name for p in lay.cases[0].channels] == [f"brain_001_{i:04d}.nii.gz" for i in (1, 3, 2, 0)]
    assert len(lay.problems) == 1 and "notes.txt" in lay.problems[0]
    assert any("brain_002" in note for note in lay.info)  # no labelsTr file: unknown labels, not an error
    (root / "imagesTr" / "notes.txt").unlink()
    ss = prepare(root, PreprocessConfig(size=16, min_foreground=0.0), cache_dir=tmp_path / "cache", progress=False)
    labels, case_of = ss.labels[:, 0], np.asarray(ss.case_ids)
    l1, l2 = labels[case_of == "brain_001"], labels[case_of == "brain_002"]
    assert len(l1) == len(l2) == shape[2]  # every axial slice (min_foreground 0)
    assert sorted(l1.tolist()) == [0.0] * (shape[2] - 1) + [1.0]  # seg > 0 on one slice only
    assert np.isnan(l2).all()  # no segmentation: unknown
