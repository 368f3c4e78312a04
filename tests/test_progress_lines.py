"""Progress a user can follow in a log file (issue 17): plain lines on stderr when stdout is not a terminal,
--threads sets torch's threads, the validation split is stratified by lesion presence."""

from __future__ import annotations

import json
import re
import sys

import numpy as np

from conftest import ROOT, cli_env, run_cli

sys.path.insert(0, str(ROOT / "plugins"))
from medcfx_sanchez.train import split_cases  # noqa: E402
from medcfx.train_announce import PlainProgress  # noqa: E402

DEMO_CASE = ROOT / "models" / "demo-inputs" / "brain" / "demo_case"


def test_plain_training_progress_lines(capsys, monkeypatch):
    clock = iter([0.0, 0.0, 1.0, 10.0, 40.0, 41.0, 80.0])  # construction, then one reading per tick
    monkeypatch.setattr("medcfx.train_announce.time.monotonic", lambda: next(clock))
    p = PlainProgress(total=100, start=0, every_s=30)
    for step, now in ((1, 1.0), (2, 10.0), (3, 40.0), (4, 41.0), (100, 80.0)):
        p.tick(step, 0.5)
    lines = capsys.readouterr().err.splitlines()
    assert [re.match(r"progress: step (\d+)/100", ln).group(1) for ln in lines] == ["1", "3", "100"]
    # steps/s over the interval since the last line: 2 steps in 39 s, then 97 steps in 40 s
    assert "0.05 steps/s" in lines[1] and "2.42 steps/s" in lines[2] and lines[2].endswith("ETA 0 s")


def test_threads_option_sets_torch_threads_for_any_command(home, tmp_path):
    env = cli_env(home)
    for n in ("1", "2"):
        run_cli(["explain", DEMO_CASE, "--method", "threshold", "--threads", n, "--out", tmp_path / n], env=env,
                check=0)
        assert json.loads((tmp_path / n / "demo_case" / "provenance.json").read_text())["threads"] == int(n)
    bad = run_cli(["--threads", "0", "models", "list"], env=env)
    assert bad.returncode == 2 and "--threads must be an integer >= 1" in bad.stderr


def test_validation_split_holds_out_lesion_and_healthy_cases():
    ids = np.array([f"c{i}" for i in range(10)])
    sick = {"c0", "c1", "c2"}  # 3 with lesion, 7 without: an unstratified 10 % split is one case of either kind
    for seed in range(20):
        train, val = split_cases(ids, 0.1, seed, lesion_cases=sick)
        assert val & sick and val - sick, (seed, val)
        assert train | val == set(ids) and not train & val
    # without strata the old behaviour stays (same draw)
    assert split_cases(ids, 0.2, 3) == split_cases(ids, 0.2, 3, lesion_cases=None)


def test_plain_log_lines_carry_no_rich_markup():
    """Request.log prints plain text (markup=False, so file names with brackets stay intact); a rich tag in
    its message would reach the user literally ("registered [bold]m:1[/bold]" did). Checked over every
    request.log call in medcfx/ and plugins/."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tag = re.compile(r"\[/?(bold|italic|red|green|yellow|dim|cyan)[^\]]*\]")
    found = []
    for path in [*root.glob("medcfx/**/*.py"), *root.glob("plugins/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "log":
                for s in ast.walk(node):
                    if isinstance(s, ast.Constant) and isinstance(s.value, str) and tag.search(s.value):
                        found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found
