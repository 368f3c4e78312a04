"""Requests are checked before any work starts; a command over several inputs goes on past a bad case.

The hostile-input benchmark (benchmarks/hostile_inputs.py) is run as a whole at the end: every bad input it
knows exits non-zero with one stderr line and leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, cli_env, run_cli
from medcfx import staging
from medcfx.errors import CaseErrors, MedcfxError, UsageError
from medcfx.inputs import CaseLog
from medcfx.method import Method, Option, check_bounds
from medcfx.train import TrainConfig
from medcfx.validate import check_fixed_by_model, check_output_folder, check_train_request

DEMO_CASE = ROOT / "models" / "demo-inputs" / "brain" / "demo_case"


# ---------------------------------------------------------------------------------------------- output folders

def test_output_folder_refuses_a_file_or_a_path_under_a_file_and_creates_nothing(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UsageError, match=r"--out .*afile: a file exists there"):
        check_output_folder(f, "--out")
    with pytest.raises(UsageError, match=r"--cache .*is a file, so no folder can be created under it"):
        check_output_folder(f / "a" / "b", "--cache")
    new = tmp_path / "x" / "y"
    assert check_output_folder(new, "--out") == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_folder_refuses_an_unwritable_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="not writable"):
            check_output_folder(ro / "out", "--out")
        with pytest.raises(UsageError, match="not writable"):
            check_output_folder(ro, "--out")
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("bounds,inside,outside", [
    ("(0, 1]", [1e-9, 0.5, 1.0], [0.0, -1.0, 1.0000001]),
    ("[0, 1)", [0.0, 0.99], [1.0, -1e-9]),
    ("[1, inf)", [1, 10**9], [0, -5]),
    ("[0, 9]", [0, 9], [-1, 10]),
])
def test_bounds_follow_interval_notation(bounds, inside, outside):
    for v in inside:
        assert check_bounds("--x", v, bounds) == v
    for v in outside:
        with pytest.raises(UsageError, match=r"^--x must be "):
            check_bounds("--x", v, bounds)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_whatever_the_interval(value):
    with pytest.raises(UsageError, match="finite"):
        check_bounds("--guidance", value, "(-inf, inf)")


def test_option_parses_and_bounds_are_checked_at_registration():
    opt = Option("noise_level", float, None, "depth", bounds="(0, 1]")
    assert opt.convert("0.25") == 0.25
    with pytest.raises(UsageError, match=r"--noise-level must be in \(0, 1\], got 5"):
        opt.convert("5")
    with pytest.raises(UsageError, match=r"--noise-level must be a finite number"):
        opt.convert("nan")
    with pytest.raises(ValueError, match="malformed interval"):
        Option("x", float, None, "", bounds="0..1")
    with pytest.raises(ValueError, match="int and float"):
        Option("x", str, None, "", bounds="[0, 1]")


def test_train_config_names_the_key_out_of_range():
    assert TrainConfig.from_dict({"steps": 3, "batch_size": 2}).steps == 3
    for key, value, says in [("steps", -5, ">= 1"), ("batch_size", 0, ">= 1"), ("lr", 0.0, "> 0"),
                             ("ema_decay", 1.5, r"in \[0, 1\]")]:
        with pytest.raises(UsageError, match=rf"^train\.{key} must be {says}"):
            TrainConfig.from_dict({key: value})
    with pytest.raises(UsageError, match="train.lr must be a number"):
        TrainConfig.from_dict({"lr": "fast"})


def test_train_request_checks_name_and_runs_dir_before_anything(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UsageError, match="^--name"):
        check_train_request({}, "../evil", tmp_path / "runs")
    with pytest.raises(UsageError, match="^--runs-dir"):
        check_train_request({}, "ok", f / "runs")
    with pytest.raises(UsageError, match="train.steps"):
        check_train_request({"train": {"steps": 0}}, None, tmp_path / "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ---------------------------------------------------------------------------------------------- seeds / overrides

def test_seed_is_refused_only_where_the_method_declares_the_command_deterministic():
    class Sampler:
        def explain(self, request): ...
        def sample(self, request): ...

    m = Method(name="m", summary="", capabilities={"explain", "sample"}, sampler=Sampler(),
               deterministic={"explain": "m explains deterministically"})
    assert m.check_seed("explain", None) == 0
    assert m.check_seed("sample", 7) == 7
    with pytest.raises(UsageError, match="m explains deterministically; --seed has no effect"):
        m.check_seed("explain", 3)
    with pytest.raises(ValueError, match="cannot predict"):
        Method(name="m", summary="", capabilities={"explain"}, sampler=Sampler(), deterministic={"predict": "x"})


def test_preprocessing_a_model_fixes_cannot_be_overridden(home):
    from medcfx.cli_models import get_registry

    reg = get_registry()
    size = reg.resolve("sanchez-demo").config["preprocess"]["size"]
    check_fixed_by_model([{"preprocess": {"size": size}}], reg, "sanchez-demo")  # the model's value: fine
    check_fixed_by_model([{"explain": {"steps": 4}}], reg, "sanchez-demo")  # other sections: not this check
    with pytest.raises(UsageError, match=rf"preprocess.size=96 cannot apply: .*sanchez-demo:\d+ was trained with "
                                         rf"preprocess.size={size}"):
        check_fixed_by_model([{"preprocess": {"size": 96}}], reg, "sanchez-demo")
    with pytest.raises(UsageError, match="records no preprocess.nosuch"):
        check_fixed_by_model([{"preprocess": {"nosuch": 1}}], reg, "sanchez-demo")
    with pytest.raises(UsageError, match="fixed by the model this command loads"):
        check_fixed_by_model([{"preprocess": {"size": size}}], reg, None)


# ---------------------------------------------------------------------------------------------- several cases

def test_case_log_records_failures_and_keeps_their_exit_status():
    log = CaseLog()
    with log.case("a.nii.gz"):
        pass
    with log.case("b.nii.gz", "b"):
        raise UsageError("--slice 99 is out of range")
    with log.case("c.nii.gz", "c"):
        raise MedcfxError("c: unreadable")  # already names its case: not prefixed again
    with pytest.raises(CaseErrors) as info:
        log.finish({"cases": ["a"]})
    assert [str(f) for f in info.value.failures] == ["b.nii.gz: --slice 99 is out of range", "c: unreadable"]
    assert info.value.summary == {"cases": ["a"]}
    assert info.value.exit_code == 1  # mixed statuses (2 and 1) -> 1
    ok = CaseLog()
    assert ok.finish({"x": 1}) == {"x": 1}
    with pytest.raises(RuntimeError):  # a bug is not a case failure
        with ok.case("d"):
            raise RuntimeError("bug")


def _corrupt_volume_case(folder: Path) -> Path:
    """A BraTS-style case folder whose FLAIR file is not gzip data."""
    case = folder / "bad_case"
    shutil.copytree(DEMO_CASE, case)
    for f in case.iterdir():
        f.rename(case / f.name.replace("demo_case", "bad_case"))
    (case / "bad_case_flair.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(200))
    return case


def test_explain_goes_on_past_a_bad_case_and_exits_non_zero_at_the_end(home, tmp_path):
    bad = _corrupt_volume_case(tmp_path)
    out = tmp_path / "out"
    env = cli_env(home)
    proc = run_cli(["explain", bad, DEMO_CASE, "--model", "sanchez-demo", "--out", out, "--device", "cpu",
                    "--steps", "4", "--slice", "6"], env=env)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("progress: ")]
    assert len(lines) == 1 and "bad_case" in lines[0] and "internal error" not in lines[0], proc.stderr
    # the good case after the bad one was written completely, the bad one not at all, nothing staged left
    heat = nib.load(str(out / "demo_case" / "heatmap.nii.gz"))
    assert heat.shape == nib.load(str(DEMO_CASE / "demo_case_flair.nii.gz")).shape
    assert np.isfinite(np.asarray(heat.dataobj)).all()
    assert sorted(p.name for p in out.iterdir()) == ["demo_case", "summary.csv", "summary.json"]


def test_explain_of_only_bad_cases_leaves_no_output_folder(home, tmp_path):
    bad = _corrupt_volume_case(tmp_path)
    out = tmp_path / "out"
    proc = run_cli(["explain", bad, "--model", "sanchez-demo", "--out", out, "--device", "cpu"], env=cli_env(home))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_explain_sweeps_temporaries_of_killed_runs_from_out(home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = staging.staging_path(out / "demo_case")
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-", 1))
    stale.mkdir()
    (stale / "heatmap.nii.gz").write_bytes(b"half")
    run_cli(["explain", DEMO_CASE, "--model", "sanchez-demo", "--out", out, "--device", "cpu", "--steps", "4",
             "--slice", "6"], env=cli_env(home), check=0)
    assert sorted(p.name for p in out.iterdir()) == ["demo_case", "summary.csv", "summary.json"]


# ---------------------------------------------------------------------------------------------- hostile inputs

def test_every_hostile_input_is_refused_cleanly():
    """benchmarks/hostile_inputs.py: each bad input exits non-zero with one stderr line, no internal error,
    nothing left behind (its own work folder, MEDCFX_HOME and temp directory)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hostile_inputs.py")], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- determinism

def test_sanchez_explain_is_bitwise_reproducible_at_one_thread_count_and_close_across_counts(home, tmp_path):
    """docs/architecture.md "Determinism": the DDIM path has no randomness (so --seed is refused); the same
    thread count gives the same bits, another thread count differs only by float summation order."""
    import json

    maps = {}
    for tag, threads in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / tag
        run_cli(["explain", DEMO_CASE, "--model", "sanchez-demo", "--out", out, "--device", "cpu", "--steps", "6",
                 "--slice", "6"], env=cli_env(home, OMP_NUM_THREADS=threads), check=0)
        maps[tag] = np.asarray(nib.load(str(out / "demo_case" / "heatmap.nii.gz")).dataobj)
        assert json.loads((out / "demo_case" / "provenance.json").read_text())["threads"] == int(threads)
    assert np.array_equal(maps["a"], maps["b"])
    assert maps["a"].max() > 0.05  # a real map, not all zeros
    np.testing.assert_allclose(maps["c"], maps["a"], rtol=0, atol=1e-4)


def test_out_that_is_or_contains_an_input_is_refused_before_anything_is_touched(home, tmp_path):
    """explain data/ --out data/ would write case folders named like the input cases over them."""
    data = tmp_path / "data"
    shutil.copytree(DEMO_CASE, data / "demo_case")
    before = sorted(p.name for p in (data / "demo_case").iterdir())
    env = cli_env(home)
    for out in (data, tmp_path):
        p = run_cli(["explain", data, "--method", "threshold", "--out", out], env=env)
        assert p.returncode == 2 and "write the outputs to a folder outside the data" in p.stderr, p.stderr
    assert sorted(p.name for p in (data / "demo_case").iterdir()) == before
    # inside the data it would become a case of the next run (found by a fresh user's test): refused ...
    p = run_cli(["explain", data, "--method", "threshold", "--out", data / "results"], env=env)
    assert p.returncode == 2 and "lies inside the input" in p.stderr and not (data / "results").exists()
    # ... except under a BIDS dataset's derivatives/, which BIDS readers never take for subjects
    (data / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    check_output_folder(data / "derivatives" / "medcfx", "--out", inputs=[data])
    with pytest.raises(UsageError, match="lies inside the input"):
        check_output_folder(data / "results", "--out", inputs=[data])
    with pytest.raises(UsageError, match="contains the input"):
        check_output_folder(tmp_path, "--out", inputs=[data])
