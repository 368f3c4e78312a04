"""Root CLI behaviour: version, env, help, one-line errors and --debug tracebacks."""

import json

import medcfx
from conftest import ROOT, cli_env, run_cli


def test_version_env_and_help(home):
    env = cli_env(home)
    assert run_cli(["--version"], env=env, check=0).stdout.strip() == f"medcfx {medcfx.__version__}"
    out = run_cli(["env"], env=env, check=0).stdout
    import torch

    assert torch.__version__ in out and "MEDCFX_HOME" in out and str(home) in out
    helptext = run_cli(["--help"], env=env, check=0).stdout
    for cmd in ("train", "explain", "grade", "evaluate", "export", "bench", "models", "data", "methods", "plugins"):
        assert cmd in helptext


def test_errors_are_one_line_and_debug_shows_the_traceback(home, tmp_path):
    env = cli_env(home)
    proc = run_cli(["models", "show", "nosuch"], env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = run_cli(["--debug", "models", "show", "nosuch"], env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "unknown model 'nosuch'" in proc.stderr
    # a click usage error (missing option) is also a non-zero exit with a message, not a traceback
    proc = run_cli(["train", "sanchez"], env=env)
    assert proc.returncode == 2 and "--data" in proc.stderr and "Traceback" not in proc.stderr


def test_methods_lists_the_bundled_plugins(home):
    methods = {m["name"]: m for m in json.loads(run_cli(["methods", "--json"], env=cli_env(home), check=0).stdout)}
    assert {"sanchez", "cdpm-healthy", "cdpm-classifier", "threshold", "diffae", "diffae-grader"} <= set(methods)
    assert methods["sanchez"]["plugin"] == "sanchez" and "explain" in methods["sanchez"]["capabilities"]
    assert [o["flag"] for o in methods["sanchez"]["options"]["explain"]][:2] == ["--guidance", "--noise-level"]


def test_bundled_models_are_listed_and_verify(home):
    env = cli_env(home)
    listing = {e["ref"]: e for e in json.loads(run_cli(["models", "list", "--json"], env=env, check=0).stdout)}
    assert listing["sanchez-demo:1"]["bundled"] is True and listing["sanchez-demo:1"]["method"] == "sanchez"
    run_cli(["models", "verify", "sanchez-demo"], env=env, check=0)


def test_backend_flags_a_method_would_not_honour_are_refused_before_any_work(home, tmp_path):
    env = cli_env(home)
    methods = {m["name"]: m for m in json.loads(run_cli(["methods", "--json"], env=env, check=0).stdout)}
    assert methods["sanchez"]["backends"] == ["torch", "bf16", "onnx"] and methods["diffae"]["backends"] == ["torch"]
    out = tmp_path / "out"
    for flags, says in ((["--backend", "onnx"], "no --backend onnx path"), (["--bf16"], "no --bf16 path")):
        proc = run_cli(["explain", "models/demo-inputs/vertebra.png", "--model", "diffae-demo", "--out", out, *flags],
                       env=env, cwd=ROOT)
        assert proc.returncode == 2 and says in proc.stderr and proc.stderr.count("\n") == 1
    assert not out.exists()  # refused before anything was written
