"""scripts/bundle_model.py: a registered model copied into a repository's models/ and registry.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cli_env  # noqa: E402

from medcfx.registry import Registry, sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bundle(env, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bundle_model.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, check=True)


def test_bundling_a_new_version_drops_the_one_whose_files_it_overwrote(tmp_path):
    home, repo = tmp_path / "home", tmp_path / "repo"
    repo.mkdir()
    reg = Registry(home, bundled=False)
    for name, text in (("m", b"first"), ("m", b"second"), ("other", b"third")):
        f = tmp_path / f"{name}-{text.decode()}.bin"
        f.write_bytes(text)
        reg.register(name, "sanchez", {"weights": f})
    env = cli_env(home)
    bundle(env, "m:1", "demo", "--version", 1, "--root", repo)
    bundle(env, "other:1", "other-demo", "--version", 1, "--root", repo)
    bundle(env, "m:2", "demo", "--version", 2, "--root", repo)
    models = yaml.safe_load((repo / "registry.yaml").read_text())["models"]
    assert [(m["name"], m["version"]) for m in models] == [("demo", 2), ("other-demo", 1)]
    demo = models[0]["artifacts"]["weights"]
    assert (repo / demo["path"]).read_bytes() == b"second"
    assert demo["sha256"] == sha256_file(repo / demo["path"]) and demo["bytes"] == 6
    # what is left verifies: every bundled artifact matches its recorded sha256
    bundled = Registry(tmp_path / "empty-home", bundled=repo / "registry.yaml")
    for ref in ("demo:2", "other-demo:1"):
        assert bundled.artifact_path(ref, "weights", verify=True).is_file()
