"""Without --model a command uses the newest registered model of its method, a user's before a bundled one,
and says which (issue 17: the mission's commands work as written)."""

from __future__ import annotations

import json

from conftest import ROOT, cli_env, run_cli
from medcfx.registry import Registry
from test_registry import make_weights

DEMO_CASE = ROOT / "models" / "demo-inputs" / "brain" / "demo_case"


def test_newest_prefers_the_users_newest_model_over_a_bundled_one(home, tmp_path):
    reg = Registry(home)
    assert reg.newest("sanchez").ref == "sanchez-demo:1"  # only the bundled one
    assert reg.newest("no-such-method") is None
    for i, name in enumerate(("mine-a", "mine-b", "mine-a")):
        w = tmp_path / f"w{i}.safetensors"
        make_weights(w, i)
        reg.register(name, "sanchez", {"weights": w})
    entries = [e for e in reg.entries() if e.method == "sanchez" and not e.bundled]
    expected = max(entries, key=lambda e: (e.created, e.version))  # created has 1 s resolution: ties by version
    assert reg.newest("sanchez").ref == expected.ref
    assert reg.newest("sanchez").bundled is False


def test_explain_and_evaluate_without_model_use_and_name_the_newest(home, tmp_path):
    env = cli_env(home)
    p = run_cli(["explain", DEMO_CASE, "--method", "sanchez", "--slice", "6", "--steps", "4", "--out", tmp_path / "a",
                 "--device", "cpu"], env=env, check=0)
    assert "using sanchez-demo:1" in p.stderr.splitlines()
    assert json.loads((tmp_path / "a" / "demo_case" / "provenance.json").read_text())["model"] == "sanchez-demo:1"
    derived = Registry(home).derive("sanchez-demo", {"tags": ["mine"]})  # a user version of the same weights
    p = run_cli(["explain", DEMO_CASE, "--method", "sanchez", "--slice", "6", "--steps", "4", "--out", tmp_path / "b",
                 "--device", "cpu"], env=env, check=0)
    assert f"using {derived.ref}" in p.stderr.splitlines()
    assert json.loads((tmp_path / "b" / "demo_case" / "provenance.json").read_text())["model"] == derived.ref
    # a method that needs no model says nothing
    p = run_cli(["explain", DEMO_CASE, "--method", "threshold", "--out", tmp_path / "c"], env=env, check=0)
    assert not any(line.startswith("using ") for line in p.stderr.splitlines())
