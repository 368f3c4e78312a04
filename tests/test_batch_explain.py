"""explain over a dataset (issue 17): parts in separate processes write exactly the files of one run,
complete cases are skipped on a rerun, a failing case is a row of summary.csv, and the flags are refused
where they cannot apply. The threshold baseline runs the same batch code as sanchez and restoration."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import demo_brains, run_cli


@pytest.fixture(scope="module")
def brains(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    _, env = demo_brains(root, {"data": (3, 7)})
    return root, env


def _tree(folder):
    """relative path -> sha256 of every file (provenance.json excepted: it records its own time and command)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "provenance.json"}


def test_two_parts_in_two_processes_write_the_files_of_one_run(brains):
    root, env = brains
    run_cli(["explain", root / "data", "--method", "threshold", "--out", root / "one"], env=env, check=0)
    exe = [sys.executable, "-m", "medcfx", "explain", str(root / "data"), "--method", "threshold",
           "--out", str(root / "parts")]
    procs = [subprocess.Popen(exe + ["--num-parts", "2", "--part-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = [[c["case"] for c in json.loads(o)["cases"]] for o, _ in outs]
    assert done == [["demo_00000", "demo_00002"], ["demo_00001"]]  # position modulo 2, before any is read
    # a final run without parts skips every complete case and rebuilds the summary of all of them
    last = json.loads(run_cli(["explain", root / "data", "--method", "threshold", "--out", root / "parts"],
                              env=env, check=0).stdout)
    assert last["cases"] == [] and sorted(last["skipped"]) == ["demo_00000", "demo_00001", "demo_00002"]
    assert _tree(root / "parts") == _tree(root / "one")
    rows = list(csv.DictReader(open(root / "one" / "summary.csv")))
    assert [r["case"] for r in rows] == ["demo_00000", "demo_00001", "demo_00002"]
    assert all(r["status"] == "ok" and float(r["image_score"]) > 0 for r in rows)


def test_resume_skips_complete_cases_unless_settings_change_or_overwrite(brains):
    root, env = brains
    out = root / "resume"
    run_cli(["explain", root / "data", "--method", "threshold", "--out", out], env=env, check=0)
    heat = out / "demo_00001" / "heatmap.nii.gz"
    stamp = heat.stat().st_mtime_ns
    again = json.loads(run_cli(["explain", root / "data", "--method", "threshold", "--out", out], env=env,
                               check=0).stdout)
    assert again["cases"] == [] and len(again["skipped"]) == 3 and heat.stat().st_mtime_ns == stamp
    other = json.loads(run_cli(["explain", root / "data", "--method", "threshold", "--out", out, "--display", "t2"],
                               env=env, check=0).stdout)
    assert len(other["cases"]) == 3 and other["skipped"] == []  # another setting: not the same output
    redo = json.loads(run_cli(["explain", root / "data", "--method", "threshold", "--out", out, "--display", "t2",
                               "--overwrite"], env=env, check=0).stdout)
    assert len(redo["cases"]) == 3


def test_a_failing_case_is_a_row_and_the_others_are_written(brains):
    root, env = brains
    data = root / "with-bad"
    shutil.copytree(root / "data", data)
    (data / "demo_00001" / "demo_00001_flair.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(100))
    out = root / "bad-out"
    p = run_cli(["explain", data, "--method", "threshold", "--out", out], env=env)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("medcfx: error")]
    assert p.returncode == 1 and len(errors) == 1 and "demo_00001" in errors[0]
    assert [c["case"] for c in json.loads(p.stdout)["cases"]] == ["demo_00000", "demo_00002"]  # what was written
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("progress: ")][-1].startswith("progress: 2/3 cases")
    rows = {r["case"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["demo_00000"]["status"] == rows["demo_00002"]["status"] == "ok"
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "demo_00001" in failed[0]["error"]


def test_part_flags_are_checked_and_refused_where_they_cannot_apply(brains):
    root, env = brains
    for args, says in ((["--num-parts", "2", "--part-id", "2"], "--part-id must be in 0..1"),
                       (["--part-id", "-1"], "--part-id")):
        p = run_cli(["explain", root / "data", "--method", "threshold", "--out", root / "x", *args], env=env)
        assert p.returncode == 2 and says in p.stderr and not (root / "x").exists()
    p = run_cli(["grade", root / "data", "--num-parts", "2", "--part-id", "0", "--out", root / "y"], env=env)
    assert p.returncode == 2 and "no shards or resume" in p.stderr
    # under torchrun each rank takes its part
    ranked = json.loads(run_cli(["explain", root / "data", "--method", "threshold", "--out", root / "rank"],
                                env={**env, "WORLD_SIZE": "3", "RANK": "2"}, check=0).stdout)
    assert ranked["part"] == "2 of 3" and [c["case"] for c in ranked["cases"]] == ["demo_00002"]
