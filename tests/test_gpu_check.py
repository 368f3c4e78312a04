"""benchmarks/gpu_check.sh in its dry mode (tiny sizes, CPU), and the driver's stage isolation and reports."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

MEASURED = ["train_fp32", "train_bf16", "sample_torch_fp32", "sample_torch_bf16", "sample_ort_cuda",
            "sample_ort_tensorrt"]


def _env(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    env["MEDCFX_HOME"] = str(tmp_path / "home")
    env["TMPDIR"] = str(tmp_path)
    return env


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run of the shell script on the CPU: (results.json, results.md, out folder, seconds)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "out"
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry", "--device", "cpu",
                           "--python", sys.executable, "--out", str(out)],
                          cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    return report, (out / "results.md").read_text(), out, seconds, tmp


def _stage(report, name):
    (st,) = [s for s in report["stages"] if s["stage"] == name]
    return st


def test_dry_run_has_every_stage_in_order_with_a_number_or_a_reason(dry):
    report, _, _, seconds, _ = dry
    assert report["mode"] == "dry"
    assert [s["stage"] for s in report["stages"]] == list(gpu_check.STAGES)
    for st in report["stages"]:
        assert math.isfinite(st["seconds"]) and st["seconds"] > 0, st
        if st["stage"] in MEASURED and st["status"] == "ok":
            assert st["figures"], st
            for f in st["figures"]:
                assert isinstance(f["value"], float) and math.isfinite(f["value"]) and f["value"] > 0, (st["stage"], f)
        elif st["status"] == "skipped":
            assert isinstance(st["reason"], str) and len(st["reason"]) > 10, st
    # on the CPU everything runs but TensorRT, which says why it cannot
    assert {s["stage"]: s["status"] for s in report["stages"]} == {
        **{s: "ok" for s in gpu_check.STAGES}, "sample_ort_tensorrt": "skipped"}
    assert "TensorrtExecutionProvider" in _stage(report, "sample_ort_tensorrt")["reason"]
    assert report["env"]["missing"] == [] and report["env"]["versions"]["torch"]
    assert report["total_seconds"] < report["budget_seconds"] and seconds < 120


def test_dry_training_rows_measure_the_steps_after_warm_up(dry):
    report = dry[0]
    for name in ("train_fp32", "train_bf16"):
        figs = {f["name"]: f for f in _stage(report, name)["figures"]}
        rate = figs["steps/s"]["value"]
        assert figs["samples/s"]["value"] == pytest.approx(4 * rate)  # the dry batch size
        assert "steps 2-2 of 2" in figs["steps/s"]["detail"]
        assert ("bf16 autocast" in figs["steps/s"]["detail"]) == (name == "train_bf16")


def test_dry_sampling_rows_agree_with_torch_fp32(dry):
    report = dry[0]
    for name in ("sample_torch_fp32", "sample_torch_bf16", "sample_ort_cuda"):
        figs = _stage(report, name)["figures"]
        assert [f["batch"] for f in figs] == [1, 2]
        for f in figs:
            assert f["gflop_per_s"] > 0 and math.isfinite(f["gflop_per_s"])
            assert "9 forwards/slice" in f["detail"]  # L = 3 of 4 steps: 3 encode + 2 x 3 guided decode
    assert all(f["max_heatmap_diff_vs_torch_fp32"] == 0 for f in _stage(report, "sample_torch_fp32")["figures"])
    # the IO-binding path (CPU provider in the dry run) computes the same counterfactual as torch fp32
    ort = _stage(report, "sample_ort_cuda")["figures"]
    assert all(f["max_heatmap_diff_vs_torch_fp32"] < 1e-4 for f in ort)
    assert "IO binding" in ort[0]["detail"]
    bf16 = _stage(report, "sample_torch_bf16")["figures"]
    assert all(0 < f["max_heatmap_diff_vs_torch_fp32"] < 1 for f in bf16)  # bf16 rounds, but stays a heatmap


def test_dry_markdown_table_shows_each_figure_and_reason(dry):
    report, md, out, _, _ = dry
    assert md.startswith("# medcfx GPU check (dry)")
    assert "bash benchmarks/gpu_check.sh --dry --device cpu" in md
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    by_stage = {}
    for cells in rows:
        by_stage.setdefault(cells[0].lstrip("| "), []).append(cells)
    assert set(by_stage) == set(gpu_check.STAGES)
    for st in report["stages"]:
        cells = by_stage[st["stage"]]
        assert all(c[1] == st["status"] for c in cells)
        if st.get("figures"):
            assert [c[3] for c in cells] == [gpu_check._fmt(f["value"]) for f in st["figures"]]
        elif st["status"] == "skipped":
            assert st["reason"] in cells[0][5]
    log = (out / "stages.log").read_text()
    assert all(f"===== {name} (" in log for name in gpu_check.STAGES)
    assert "using" in (out / "setup.log").read_text()


def _ok(ctx):
    return {"figures": [{"name": "x", "value": 1.0, "unit": "s"}]}


def _raise(ctx):
    raise ValueError("broken on purpose\nsecond line")


def _skip(ctx):
    raise gpu_check.Skip("no such provider here")


def _hang(ctx):
    time.sleep(60)


def _die(ctx):
    os.kill(os.getpid(), signal.SIGKILL)


def test_run_isolated_turns_each_failure_into_a_row(tmp_path):
    ctx = gpu_check.Context(dry=False, device="auto", work=tmp_path, sizes=gpu_check.DRY_SIZES)
    log = tmp_path / "logs" / "s.log"
    assert gpu_check.run_isolated(_ok, ctx, 30, log)["figures"][0]["value"] == 1.0
    err = gpu_check.run_isolated(_raise, ctx, 30, log)
    assert err["status"] == "error" and err["reason"] == "ValueError: broken on purpose"
    assert "Traceback" in log.read_text()
    skipped = gpu_check.run_isolated(_skip, ctx, 30, log)
    assert (skipped["status"], skipped["reason"]) == ("skipped", "no such provider here")
    t0 = time.perf_counter()
    hung = gpu_check.run_isolated(_hang, ctx, 1.0, log)
    assert hung["status"] == "timeout" and "1 s" in hung["reason"] and time.perf_counter() - t0 < 10
    dead = gpu_check.run_isolated(_die, ctx, 30, log)
    assert dead["status"] == "crashed" and "signal 9" in dead["reason"]


def test_steady_rate_leaves_out_the_warm_up_steps():
    rows = [{"step": 10, "it_s": 1.0}, {"step": 20, "it_s": 4.0}, {"step": 25, "it_s": 5.0}, {"step": 25, "val": 1}]
    assert gpu_check.steady_rate(rows, 10) == (pytest.approx(15 / (10 / 4 + 5 / 5)), 15)
    with pytest.raises(gpu_check.StageError, match="warm-up"):
        gpu_check.steady_rate(rows[:1], 10)


def test_a_failed_stage_does_not_stop_the_ones_after_it(tmp_path):
    """Without the export stage the onnxruntime rows fail with that reason; torch fp32 still measures."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--device", "cpu",
                           "--out", str(out), "--work", str(tmp_path / "work"),
                           "--only", "sample_torch_fp32,sample_ort_cuda"],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    status = {s["stage"]: s for s in report["stages"]}
    assert status["export"]["status"] == "skipped" and status["export"]["reason"] == "not in --only"
    assert status["sample_ort_cuda"]["status"] == "error"
    assert status["sample_ort_cuda"]["reason"] == "no ONNX file: the export stage did not finish"
    assert status["sample_torch_fp32"]["status"] == "ok" and status["sample_torch_fp32"]["figures"][0]["value"] > 0
    md = (out / "results.md").read_text()
    assert "| sample_ort_cuda | error | - | - | - | no ONNX file: the export stage did not finish |" in md


def test_an_exhausted_budget_skips_the_remaining_stages_and_still_reports(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget", "20", "--started", str(time.time() - 10)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["skipped"] * len(gpu_check.STAGES)
    assert all(s["reason"] == "out of time (20 s budget)" for s in report["stages"])


def test_script_refuses_bad_arguments(tmp_path):
    sh = str(ROOT / "benchmarks" / "gpu_check.sh")
    bad = subprocess.run(["bash", sh, "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument '--frobnicate'" in bad.stderr
    nopy = subprocess.run(["bash", sh, "--python", str(tmp_path / "no-python"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=30)
    assert nopy.returncode == 2 and "no Python interpreter" in nopy.stderr
    cpu_full = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                               "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")],
                              capture_output=True, text=True, timeout=60)
    assert cpu_full.returncode == 2 and "--device cpu is for --dry runs" in cpu_full.stderr
