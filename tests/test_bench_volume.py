"""`medcfx bench --volume`: a real explain subprocess per sampler on one volume; the slices it samples are
those with foreground, counted here independently from the NIfTI files with numpy."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console

from medcfx.bench_volume import bench_volume, synthetic_volume
from medcfx.registry import Registry


def _foreground_slices(case, axis=2, min_fraction=0.05):
    """Axial slices whose foreground area (any contrast differing from its corner background) is at least
    ``min_fraction`` of the largest slice's (the preprocessing rule, written out by brute force)."""
    fg = None
    for f in sorted(case.glob("*.nii.gz")):
        if "seg" in f.name:
            continue
        x = np.asarray(nib.load(f).dataobj)
        corners = [x[i, j, k] for i in (0, -1) for j in (0, -1) for k in (0, -1)]
        background = max(set(corners), key=corners.count)
        fg = (x != background) if fg is None else fg | (x != background)
    area = fg.sum(axis=tuple(a for a in range(3) if a != axis))
    return int((area >= min_fraction * area.max()).sum()), len(area)


def test_volume_bench_runs_explain_per_sampler_on_the_foreground_slices(tmp_path, home):
    case = synthetic_volume(tmp_path / "data", shape=(40, 40, 24), seed=3)
    sampled, total = _foreground_slices(case)
    assert sampled < total  # the case has slices without foreground, so skipping them is exercised
    rows = bench_volume(Registry(), "sanchez-demo", case, ["paper", "fast"], 4, Console(file=None, quiet=True),
                        extra=["--steps", "2"])
    assert [r["sampler"] for r in rows] == ["paper", "fast"]
    assert [r["params"]["solver"] for r in rows] == ["ddim", "dpm++2m"]
    for r in rows:
        assert r["sampled_slices"] == sampled and r["volume_shape"] == [40, 40, 24]
        assert r["params"]["steps"] == 2 and r["seconds"] > 0 and r["peak_rss_mib"] > 50
        assert r["seconds_per_sampled_slice"] == pytest.approx(r["seconds"] / sampled)
    assert rows[0]["speedup_vs_first"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,8"], "one --batch size"),
    (["--sampler", "paper,quick"], "--sampler expects"),
    (["--case", "no/such/case"], "--case no/such/case: no such file"),
])
def test_volume_bench_refuses_bad_options_before_work(args, message, home):
    p = subprocess.run([sys.executable, "-m", "medcfx", "bench", "sanchez-demo", "--volume", *args],
                       capture_output=True, text=True)
    assert p.returncode != 0 and message in p.stderr, p.stderr


@pytest.mark.parametrize("args, message", [
    (["--volume", "--repeats", "0"], "--repeats applies to the slice bench"),
    (["--volume", "--backend", "reference"], "one --backend, torch or onnx"),
    (["--volume", "--backend", "onnx"], "has no ONNX export"),
    (["--volume", "--solver", "heun"], "--solver must be one of ddim, dpm++2m, dpm++3m"),
    (["--solver", "heun"], "--solver must be one of"),
    (["--sampler", "fast"], "--sampler applies with --volume only"),
    (["--case", "x"], "--case applies with --volume only"),
])
def test_bench_options_that_do_not_apply_are_refused(args, message, home):
    p = subprocess.run([sys.executable, "-m", "medcfx", "bench", "sanchez-demo", *args], capture_output=True, text=True)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_bench_refuses_a_method_without_samplers(home):
    p = subprocess.run([sys.executable, "-m", "medcfx", "bench", "restoration-demo", "--volume"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "--sampler paths" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "medcfx", "bench", "restoration-demo", "--batch", "1"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "restoration-demo:2 is a restoration model" in p.stderr, p.stderr


def test_measured_peak_rss_is_the_commands_own_not_the_parents():
    """Linux carries a process's RSS high-water mark across fork and exec, so a child started by a big parent
    reports the parent's size; measured_run must not. Here the parent holds ~600 MiB and the children use
    nothing / ~300 MiB of their own (numpy pages written)."""
    import numpy as np

    from medcfx.bench_volume import measured_run

    held = np.ones(600 * 2**20 // 8)  # written, so resident
    _, small, code, _ = measured_run([sys.executable, "-c", "pass"])
    _, big, code2, _ = measured_run([sys.executable, "-c", "import numpy; a = numpy.ones(300 * 2**20 // 8)"])
    assert code == code2 == 0 and held.sum() > 0
    assert small < 100  # a bare interpreter, not the 600 MiB parent
    assert 300 < big < 300 + 150  # its own 300 MiB plus numpy's import
    _, _, code3, err = measured_run([sys.executable, "-c", "import sys; sys.exit('bad thing')"])
    assert code3 == 1 and "bad thing" in err
