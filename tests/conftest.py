import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY_SRC = Path(__file__).resolve().parent / "toy_plugin"


def make_dist(site: Path, dist: str, package_src: Path | None, entry_points: dict[str, str], version: str = "0.1") -> Path:
    """Install a package into ``site`` the way pip lays it out: the package plus a .dist-info with entry points.

    importlib.metadata discovers it from sys.path / PYTHONPATH exactly as it would a pip-installed plugin.
    """
    site.mkdir(parents=True, exist_ok=True)
    if package_src is not None:
        shutil.copytree(package_src, site / package_src.name, dirs_exist_ok=True)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"  # pip's naming: name_with_underscores-version
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[medcfx]\n{lines}")
    return site


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private MEDCFX_HOME / cache for one test (in-process and for subprocesses)."""
    h = tmp_path / "medcfx-home"
    h.mkdir()
    monkeypatch.setenv("MEDCFX_HOME", str(h))
    monkeypatch.setenv("MEDCFX_CACHE", str(h / "cache"))
    return h


@pytest.fixture
def toy_site(tmp_path):
    return make_dist(tmp_path / "site", "medcfx-toy", TOY_SRC / "medcfx_toy", {"toy": "medcfx_toy"})


def cli_env(home: Path, *extra_paths: Path, **env) -> dict:
    e = dict(os.environ)
    e["MEDCFX_HOME"] = str(home)
    e["MEDCFX_CACHE"] = str(home / "cache")
    e["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in extra_paths), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["COLUMNS"] = "200"
    e.update(env)
    return e


def run_cli(args, env=None, cwd=None, check=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real ``medcfx`` console script in a subprocess."""
    exe = Path(sys.executable).parent / "medcfx"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "medcfx"]
    proc = subprocess.run(cmd + [str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def demo_brains(root: Path, sets: dict[str, tuple[int, int]]) -> tuple[Path, dict]:
    """A private MEDCFX_HOME under ``root`` and demo brain datasets ``root/NAME`` made by the real CLI
    (``sets``: NAME -> (cases, seed)); returns (home, env)."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    env = cli_env(home)
    for name, (cases, seed) in sets.items():
        run_cli(["data", "demo", "brain", "--out", root / name, "--cases", cases, "--seed", seed], env=env, check=0)
    return home, env
