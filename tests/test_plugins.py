"""Plugin system: entry-point discovery, allow/block lists, hook validation, capability checks."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import cli_env, make_dist, run_cli
from medcfx.errors import UsageError
from medcfx.method import Method, Option


def methods_json(env):
    proc = run_cli(["methods", "--json"], env=env, check=0)
    return {m["name"]: m for m in json.loads(proc.stdout)}


def test_third_party_plugin_appears_and_lists_capabilities(home, toy_site):
    env = cli_env(home, toy_site)
    toy = methods_json(env)["toy"]
    assert toy["plugin"] == "toy"
    assert toy["capabilities"] == ["sample", "train"]
    assert toy["input_channels"] == [1]
    assert [o["flag"] for o in toy["options"]["sample"]] == ["--steps"]
    plugins = {p["name"]: p for p in json.loads(run_cli(["plugins", "--json"], env=env, check=0).stdout)}
    assert plugins["toy"]["status"] == "loaded"
    assert plugins["toy"]["methods"] == ["toy"]
    assert set(plugins["toy"]["hooks"]) == {"register_methods", "register_commands"}
    assert plugins["toy"]["source"] == "medcfx-toy 0.1"


def test_plugin_adds_cli_command(home, toy_site):
    proc = run_cli(["toy-hello", "--name", "ada"], env=cli_env(home, toy_site), check=0)
    assert proc.stdout.strip() == "hello ada from toy"


def test_block_and_allow_lists(home, toy_site, tmp_path):
    other = make_dist(toy_site, "medcfx-other", None, {"other": "medcfx_other"})
    (other / "medcfx_other.py").write_text(textwrap.dedent("""
        from medcfx import hookimpl
        from medcfx.method import Method
        class S:
            def sample(self, request):
                return {}
        @hookimpl
        def register_methods(register):
            register(Method(name="other", summary="x", capabilities={"sample"}, sampler=S()))
    """))
    assert {"toy", "other"} <= set(methods_json(cli_env(home, toy_site)))
    blocked = methods_json(cli_env(home, toy_site, MEDCFX_PLUGINS="-toy"))
    assert "toy" not in blocked and "other" in blocked
    only = methods_json(cli_env(home, toy_site, MEDCFX_PLUGINS="other"))
    assert "other" in only and "toy" not in only
    plugins = {p["name"]: p for p in json.loads(run_cli(["plugins", "--json"], env=cli_env(home, toy_site, MEDCFX_PLUGINS="-toy"), check=0).stdout)}
    assert plugins["toy"]["status"].startswith("blocked")


def test_unknown_hook_name_is_rejected(home, toy_site):
    make_dist(toy_site, "medcfx-typo", None, {"typo": "medcfx_typo"})
    (toy_site / "medcfx_typo.py").write_text(textwrap.dedent("""
        from medcfx import hookimpl
        @hookimpl
        def register_method(register):   # typo: the hook is register_methods
            pass
    """))
    proc = run_cli(["methods"], env=cli_env(home, toy_site))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "plugin 'typo'" in lines[0] and "unknown hook" in lines[0]


def test_broken_plugin_is_reported_not_fatal(home, toy_site):
    make_dist(toy_site, "medcfx-broken", None, {"broken": "medcfx_broken"})
    (toy_site / "medcfx_broken.py").write_text("raise ImportError('needs libfoo')\n")
    env = cli_env(home, toy_site)
    proc = run_cli(["methods", "--json"], env=env, check=0)
    assert "toy" in {m["name"] for m in json.loads(proc.stdout)}
    assert "plugin 'broken' could not be loaded" in proc.stderr
    plugins = {p["name"]: p for p in json.loads(run_cli(["plugins", "--json"], env=env, check=0).stdout)}
    assert plugins["broken"]["status"].startswith("failed: ImportError: needs libfoo")


def test_missing_capability_fails_before_work(home, toy_site, tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"not even read")
    out = tmp_path / "out"
    proc = run_cli(["explain", img, "--method", "toy", "--out", out], env=cli_env(home, toy_site))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "medcfx: error: method 'toy' cannot explain (it can: sample, train)"
    assert not out.exists()


def test_unknown_method_and_option_are_one_line_errors(home, toy_site, tmp_path):
    env = cli_env(home, toy_site)
    proc = run_cli(["train", "nosuch", "--data", tmp_path], env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown method 'nosuch'" in proc.stderr and "toy" in proc.stderr
    proc = run_cli(["sample", "--method", "toy", "--bogus", "1"], env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown option --bogus" in proc.stderr and "--steps" in proc.stderr


def test_real_pip_install_of_a_plugin_package(home, tmp_path):
    """A plugin built and installed by pip from a temporary source package (pyproject + entry point)."""
    src = tmp_path / "src"
    (src / "medcfx_piptoy").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "medcfx-piptoy"
        version = "0.3"
        [project.entry-points.medcfx]
        piptoy = "medcfx_piptoy"
    """))
    (src / "medcfx_piptoy" / "__init__.py").write_text(textwrap.dedent("""
        from medcfx import hookimpl
        from medcfx.method import Method
        class S:
            def sample(self, request):
                return {"n": request.extra["n"]}
        @hookimpl
        def register_methods(register):
            register(Method(name="piptoy", summary="installed by pip", capabilities={"sample"}, sampler=S()))
    """))
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True)
    env = cli_env(home, target)
    assert methods_json(env)["piptoy"]["capabilities"] == ["sample"]
    proc = run_cli(["sample", "--method", "piptoy", "-n", "3"], env=env, check=0)
    assert json.loads(proc.stdout) == {"n": 3}


# ------------------------------------------------------------------ in-process contract checks


class _S:
    def sample(self, request):
        return {}


def test_method_declaring_an_unimplemented_capability_is_refused():
    with pytest.raises(ValueError, match="declares 'explain'"):
        Method(name="m", summary="", capabilities={"explain"}, sampler=_S())
    with pytest.raises(ValueError, match="unknown capabilities"):
        Method(name="m", summary="", capabilities={"fly"})


def test_option_parsing_types_and_errors():
    m = Method(name="m", summary="", capabilities={"sample"}, sampler=_S(), options={"sample": [
        Option("guidance", float, 3.0, ""), Option("steps", int, 100, ""), Option("reconstruct", bool, False, ""),
        Option("target", list, [], ""), Option("mode", str, "a", "", choices=("a", "b"))]})
    got = m.parse_options("sample", ["--guidance", "1.5", "--steps=7", "--reconstruct", "--target", "x, y", "--mode", "b"])
    assert got == {"guidance": 1.5, "steps": 7, "reconstruct": True, "target": ["x", "y"], "mode": "b"}
    assert m.parse_options("sample", []) == {"guidance": 3.0, "steps": 100, "reconstruct": False, "target": [], "mode": "a"}
    for bad in (["--steps", "x"], ["--mode", "c"], ["--guidance"], ["stray"], ["--reconstruct=maybe"]):
        with pytest.raises(UsageError):
            m.parse_options("sample", bad)
