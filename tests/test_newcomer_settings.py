"""Issue 20, item 1: settings a newcomer can discover.

- a training run says which preset and how big a network it trains, and how long it will take, before the
  long part (``fit``'s announce line);
- ``medcfx methods NAME`` lists the presets and every key ``--set`` accepts; ``--print-config`` shows the
  resolved config and does nothing else;
- a metric that cannot be computed (NaN) is stored and written as JSON null with a reason, never as NaN.
"""

import copy
import json
import re
import sys

import numpy as np
import torch
import yaml

from conftest import ROOT, cli_env, run_cli
from medcfx.train import TrainConfig, fit, uniform_batches


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity (as every non-Python JSON reader does)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def walk_leaves(d: dict, prefix: str = "") -> dict:
    """Every leaf of a nested dict as {dotted key: value} (an empty dict is a leaf), written independently
    of medcfx.config_keys."""
    out = {}
    for k, v in d.items():
        key = prefix + k
        if isinstance(v, dict) and v:
            out.update(walk_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def jsonable(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as YAML / JSON output has them


# ------------------------------------------------------------------ fit says preset, size and time first


def _tiny_problem(calls: list):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))

    def loss_fn(net, batch):
        calls.append(batch.step)
        return net(batch.randn(4)).pow(2).mean(), {}

    return model, loss_fn


def _parse_announce(line: str) -> int:
    m = re.search(r"network ([\d,]+) parameters", line)
    assert m, line
    return int(m.group(1).replace(",", ""))


def test_fit_announces_preset_network_size_and_time_after_the_first_timed_steps(tmp_path):
    calls: list[int] = []
    said: list[tuple[str, int]] = []
    model, loss_fn = _tiny_problem(calls)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "x", "preset": "demo", "config": {}}))
    cfg = TrainConfig(steps=40, batch_size=4, log_every=100, ckpt_every=100)
    fit(model, loss_fn, uniform_batches(8), cfg, run, progress=False, log=lambda s: said.append((s, len(calls))))
    assert len(said) == 1, said  # one line, once
    line, steps_done = said[0]
    assert steps_done == 6  # the first step warms up, the next 5 are timed: then the line, before the rest
    assert _parse_announce(line) == sum(p.numel() for p in model.parameters()) == 4 * 16 + 16 + 16 * 4 + 4
    assert "preset demo" in line and "40 steps of batch 4" in line
    assert re.search(r"over 5 timed step\(s\) -> about .* for the 34 steps left", line), line


def test_fit_without_a_preset_says_so_and_a_short_run_still_gets_its_line(tmp_path):
    calls: list[int] = []
    said: list[str] = []
    model, loss_fn = _tiny_problem(calls)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "x", "preset": None, "config": {}}))
    fit(model, loss_fn, uniform_batches(8), TrainConfig(steps=2, batch_size=2), run, progress=False, log=said.append)
    assert len(said) == 1 and "no --preset (the method's defaults)" in said[0] and "steps left" not in said[0]
    # a loop called without a run record names no preset at all, and a run of one step times that step
    said.clear()
    (tmp_path / "bare").mkdir()
    fit(model, loss_fn, uniform_batches(8), TrainConfig(steps=1, batch_size=2), tmp_path / "bare", progress=False,
        log=said.append)
    assert len(said) == 1 and "preset" not in said[0] and "over 1 timed step(s)" in said[0]


def test_cli_training_prints_the_line_with_the_networks_parameter_count(home, toy_site, tmp_path):
    """The toy plugin trains through the real CLI; the count is recomputed here from its network config."""
    from medcfx.nn import UNet

    rng = np.random.default_rng(0)
    np.save(tmp_path / "toyset.npy", rng.standard_normal((16, 1, 8, 8)).astype(np.float32))
    env = cli_env(home, toy_site)
    proc = run_cli(["train", "toy", "--data", "toyset.npy", "--runs-dir", "runs", "--device", "cpu",
                    "--set", "train.steps=8"], env=env, cwd=tmp_path, check=0)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train:")]
    assert len(lines) == 1, proc.stderr
    sys.path.insert(0, str(toy_site))
    try:
        from medcfx_toy import NETWORK
    finally:
        sys.path.remove(str(toy_site))
    assert _parse_announce(lines[0]) == sum(p.numel() for p in UNet.from_config(NETWORK).parameters())
    assert "no --preset" in lines[0] and "8 steps of batch 8" in lines[0]
    # provenance: absolute paths, whatever the user typed
    entry = strict_loads(run_cli(["models", "show", "toy", "--json"], env=env, check=0).stdout)
    assert entry["provenance"]["data"] == str((tmp_path / "toyset.npy").resolve())
    assert entry["provenance"]["run"] == str((tmp_path / "runs" / "toy" / "toyset" / "v1").resolve())
    record = yaml.safe_load((tmp_path / "runs" / "toy" / "toyset" / "v1" / "config.yaml").read_text())
    assert record["data"] == str((tmp_path / "toyset.npy").resolve()) and record["preset"] is None


# ------------------------------------------------------------------ methods NAME: presets and settings


def test_methods_json_lists_every_setting_with_its_default_and_the_presets(home):
    from medcfx.plugins import get_plugins

    env = cli_env(home)
    listed = {m["name"]: m for m in strict_loads(run_cli(["methods", "--json"], env=env, check=0).stdout)}
    for method in get_plugins().methods().values():
        defaults = dict(method.defaults)
        presets = defaults.pop("presets", {})
        want = {k: jsonable(v) for k, v in walk_leaves(defaults).items()}
        got = {s["key"]: s["default"] for s in listed[method.name]["settings"]}
        assert got == want, method.name
        assert set(listed[method.name]["presets"]) == set(presets)
        for name, over in presets.items():
            assert listed[method.name]["presets"][name] == {k: jsonable(v) for k, v in walk_leaves(over).items()}
    meanings = {s["key"]: s["meaning"] for s in listed["sanchez"]["settings"]}
    assert meanings["train.steps"] and meanings["network.channel_mult"] and meanings["cfg_dropout"]
    assert listed["sanchez"]["presets"]["paper"] == {}  # the paper preset is the defaults


def test_methods_table_shows_backends_presets_and_every_setting(home):
    from medcfx.plugins import get_plugins

    env = cli_env(home)
    table = run_cli(["methods"], env=env, check=0).stdout
    assert "backends" in table
    out = run_cli(["methods", "sanchez"], env=env, check=0).stdout
    assert re.search(r"^backends\s+torch, bf16, onnx\s*$", out, re.M), out
    lines = out.splitlines()
    defaults = dict(get_plugins().method("sanchez").defaults)
    presets = defaults.pop("presets")
    for name in presets:
        assert any(ln.strip().startswith(f"{name}:") for ln in lines), name
    keys = [ln.split()[0] for ln in lines if ln.strip() and not ln.startswith(" ")]
    for key in walk_leaves(defaults):
        assert key in keys, key


# ------------------------------------------------------------------ --print-config


def test_print_config_prints_the_resolved_config_and_does_nothing_else(home, tmp_path):
    from medcfx.plugins import get_plugins

    env = cli_env(home)
    sanchez = dict(get_plugins().method("sanchez").defaults)
    presets = sanchez.pop("presets")
    data = tmp_path / "brain"
    data.mkdir()
    proc = run_cli(["train", "sanchez", "--data", data, "--preset", "demo", "--set", "train.steps=7",
                    "--runs-dir", tmp_path / "runs", "--print-config"], env=env, check=0)
    want = merged(merged(sanchez, presets["demo"]), {"train": {"steps": 7}})
    assert yaml.safe_load(proc.stdout) == jsonable(want)
    assert not (tmp_path / "runs").exists()
    # inference commands: the same for explain / evaluate (nothing written to --out)
    out = tmp_path / "out"
    proc = run_cli(["explain", "models/demo-inputs/brain/demo_case", "--model", "sanchez-demo", "--out", out,
                    "--set", "explain.steps=9", "--print-config"], env=env, check=0, cwd=ROOT)
    assert yaml.safe_load(proc.stdout) == jsonable(merged(sanchez, {"explain": {"steps": 9}}))
    proc = run_cli(["evaluate", "sanchez", "--model", "sanchez-demo", "--data", data, "--out", out,
                    "--print-config"], env=env, check=0)
    assert yaml.safe_load(proc.stdout) == jsonable(sanchez)
    assert not out.exists() and not (tmp_path / "medcfx-eval").exists()
    # grade and sample share the code path
    diffae = dict(get_plugins().method("diffae-grader").defaults)
    proc = run_cli(["grade", "models/demo-inputs/vertebra.png", "--print-config"], env=env, check=0, cwd=ROOT)
    assert yaml.safe_load(proc.stdout) == jsonable(diffae)
    mediffusion = dict(get_plugins().method("mediffusion").defaults)
    mediffusion.pop("presets")
    for command in (["sample", "--method", "mediffusion", "-n", "2"],
                    ["predict", ROOT / "models/demo-inputs/cxr.png", "--model", "mediffusion-demo"]):
        proc = run_cli([*command, "--set", "sample.steps=3", "--print-config"], env=env, check=0, cwd=tmp_path)
        assert yaml.safe_load(proc.stdout) == jsonable(merged(mediffusion, {"sample": {"steps": 3}})), command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brain", "medcfx-home"]  # nothing written


# ------------------------------------------------------------------ NaN metrics: null with a reason


def test_registry_stores_a_metric_that_could_not_be_computed_as_null_with_a_reason(home, tmp_path, capsys):
    from medcfx.registry import Registry

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    reg = Registry(home, bundled=False)
    entry = reg.register("m", "toy", {"weights": weights}, metrics={"val_AUPRC": float("nan"), "loss": 0.5,
                                                                     "val_AUROC": np.float32("nan")})
    assert entry.metrics == {"val_AUPRC": None, "loss": 0.5, "val_AUROC": None}
    notes = entry.extra["null_values"]
    assert set(notes) == {"metrics.val_AUPRC", "metrics.val_AUROC"} and "NaN" in notes["metrics.val_AUPRC"]
    err = capsys.readouterr().err
    assert "warning" in err and "metrics.val_AUPRC" in err and "m:1" in err
    text = (home / "registry.yaml").read_text()
    assert ".nan" not in text.lower()
    shown = strict_loads(run_cli(["models", "show", "m", "--json"], env=cli_env(home), check=0).stdout)
    assert shown["metrics"]["val_AUPRC"] is None and "metrics.val_AUPRC" in shown["null_values"]
    strict_loads(run_cli(["models", "list", "--json"], env=cli_env(home), check=0).stdout)
    # metrics added later (the sanchez trainer's validation): NaN again null; a number replaces the note
    entry = reg.add_artifacts("m:1", {}, extra={"metrics": {"val_Dice": float("nan"), "val_AUROC": 0.75}})
    assert entry.metrics["val_Dice"] is None and entry.metrics["val_AUROC"] == 0.75
    assert set(entry.extra["null_values"]) == {"metrics.val_AUPRC", "metrics.val_Dice"}
    assert set(reg.resolve("m:1").extra["null_values"]) == {"metrics.val_AUPRC", "metrics.val_Dice"}


def test_write_json_is_strict_json_with_a_note_and_a_warning(tmp_path, capsys):
    from medcfx.provenance import write_json

    path = write_json(tmp_path / "metrics.json", {"metrics": {"AP": float("nan"), "Dice": 0.5,
                                                              "per_case": [1.0, float("inf")]}, "n": 3})
    got = strict_loads(path.read_text())
    assert got["metrics"] == {"AP": None, "Dice": 0.5, "per_case": [1.0, None]} and got["n"] == 3
    assert set(got["null_values"]) == {"metrics.AP", "metrics.per_case[1]"}
    assert "NaN" in got["null_values"]["metrics.AP"] and "inf" in got["null_values"]["metrics.per_case[1]"]
    err = capsys.readouterr().err
    assert "metrics.json" in err and "metrics.AP" in err
    # nothing to say when every value is a number
    write_json(tmp_path / "ok.json", {"a": 1.0})
    assert strict_loads((tmp_path / "ok.json").read_text()) == {"a": 1.0} and capsys.readouterr().err == ""
