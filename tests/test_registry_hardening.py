"""Registry hardening: every stored path confined, ONNX run from verified bytes, bounded imports, file modes
kept, temporaries of dead writers swept, unreferenced objects found and removed."""

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import cli_env, run_cli
from medcfx import staging
from medcfx.errors import IntegrityError
from medcfx.registry import Registry
from test_registry import make_weights, sha


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _catalogue(folder: Path, rel: str, target: Path) -> Path:
    """A bundled catalogue with one entry whose weights path is ``rel`` and whose sha256/bytes are those of
    ``target`` (so only the location rule can refuse it)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"path": rel, "sha256": sha(target), "bytes": target.stat().st_size}
    data = {"schema": 1, "models": [{"name": "evil", "version": 1, "method": "sanchez", "created": "x",
                                     "artifacts": {"weights": record}}]}
    path = folder / "registry.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_bundled_catalogue_paths_are_confined(home, tmp_path, kind):
    secret = tmp_path / "secret.safetensors"
    make_weights(secret, 3)
    cat_dir = tmp_path / "catalogue"
    if kind == "dotdot":
        rel = "../../../../../../../../" + str(secret).lstrip("/")
    elif kind == "absolute":
        rel = str(secret)
    else:
        (cat_dir / "models").mkdir(parents=True)
        (cat_dir / "models" / "w.safetensors").symlink_to(secret)
        rel = "models/w.safetensors"
    cat = _catalogue(cat_dir, rel, secret)
    reg = Registry(home, bundled=cat)
    with pytest.raises(IntegrityError, match="evil:1"):
        reg.load_tensors("evil")
    problems = reg.verify()
    assert len(problems) == 1 and problems[0][0] == "evil:1"
    with pytest.raises(IntegrityError):
        reg.export("evil", tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()
    # the CLI: verify fails (exit 3) naming the entry; export writes nothing
    env = cli_env(home, MEDCFX_BUNDLED_REGISTRY=str(cat))
    proc = run_cli(["models", "verify"], env=env, check=3)
    assert "FAIL evil:1" in proc.stdout and " OK " not in proc.stdout
    proc = run_cli(["models", "export", "evil", str(tmp_path / "cli.tar")], env=env)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["secret.safetensors", "catalogue", "medcfx-home"])


def test_registry_file_and_archive_keep_the_umask_or_existing_mode(home, tmp_path):
    old = os.umask(0o022)
    try:
        w = tmp_path / "w.safetensors"
        make_weights(w, 1)
        reg = Registry(home, bundled=False)
        reg.register("m", "sanchez", {"weights": w})
        assert stat.S_IMODE(reg.registry_file.stat().st_mode) == 0o644  # not mkstemp's 0600
        os.chmod(reg.registry_file, 0o640)  # a group-shared store
        reg.register("m", "sanchez", {"weights": w})
        assert stat.S_IMODE(reg.registry_file.stat().st_mode) == 0o640
        out = reg.export("m", tmp_path / "m.tar")
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def _archive_with_oversized_member(src: Path, dest: Path, extra: int) -> None:
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.startswith("artifacts/"):
                data = data + b"\0" * extra  # the member expands beyond what entry.yaml records
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def test_import_compares_member_sizes_before_reading_and_leaves_nothing(home, tmp_path):
    w = tmp_path / "w.safetensors"
    make_weights(w, 1)
    src = Registry(home, bundled=False)
    src.register("m", "sanchez", {"weights": w})
    src.export("m", tmp_path / "m.tar")
    _archive_with_oversized_member(tmp_path / "m.tar", tmp_path / "bomb.tar", extra=8 << 20)
    target_home = tmp_path / "target"
    target = Registry(target_home, bundled=False)
    before = set(Path(tempfile.gettempdir()).glob("medcfx-*"))
    with pytest.raises(IntegrityError, match="bytes in the archive but entry.yaml records"):
        target.import_(tmp_path / "bomb.tar")
    assert set(Path(tempfile.gettempdir()).glob("medcfx-*")) == before
    leftovers = [p for p in target_home.rglob("*") if p.name != "registry.lock"] if target_home.exists() else []
    assert leftovers == []
    assert target.import_(tmp_path / "m.tar").ref == "m:1"


def test_import_of_a_file_that_is_not_an_archive_is_one_line(home, tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(os.urandom(4096))
    proc = run_cli(["models", "import", str(junk)], env=cli_env(home))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is not a tar archive" in lines[0] and str(junk) in lines[0]


def test_temporaries_of_dead_writers_are_swept_and_unreferenced_objects_reported(home, tmp_path):
    w = tmp_path / "w.safetensors"
    make_weights(w, 1)
    reg = Registry(home, bundled=False)
    entry = reg.register("m", "sanchez", {"weights": w})
    host, dead = staging._host_tag(), _dead_pid()
    stale_yaml = home / f"{staging.PREFIX}{dead}-{host}-00000000-registry.yaml"
    stale_yaml.write_text("half")
    obj_dir = home / "objects" / "sha256" / entry.digest[:2]
    stale_obj = obj_dir / f"{staging.PREFIX}{dead}-{host}-00000001-{entry.digest}.safetensors"
    stale_obj.write_bytes(b"half")
    live = staging.staging_path(home / "import")  # this process runs: never swept
    live.mkdir()
    orphan_bytes = b"an object no entry references"
    digest = hashlib.sha256(orphan_bytes).hexdigest()
    orphan = home / "objects" / "sha256" / digest[:2] / f"{digest}.safetensors"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(orphan_bytes)

    make_weights(tmp_path / "w2.safetensors", 2)
    reg.register("n", "sanchez", {"weights": tmp_path / "w2.safetensors"})  # any write sweeps
    assert not stale_yaml.exists() and not stale_obj.exists() and live.is_dir()
    live.rmdir()

    env = cli_env(home)
    proc = run_cli(["models", "verify"], env=env, check=0)
    assert f"UNREFERENCED {orphan}" in proc.stdout and "1 stored object(s) belong to no model" in proc.stdout
    assert orphan.exists()
    proc = run_cli(["models", "verify", "--fix"], env=env, check=0)
    assert f"REMOVED {orphan}" in proc.stdout and not orphan.exists()
    after = run_cli(["models", "verify"], env=env, check=0).stdout
    assert reg.verify() == [] and "OK   m:1" in after and "OK   n:1" in after and "UNREFERENCED" not in after


# ------------------------------------------------------------------------------------------------- ONNX
def _onnx_entry(home, tmp_path):
    import onnx

    from medcfx.export import export_unet
    from test_export import _register

    reg, entry, unet = _register(home)
    single = tmp_path / "single.onnx"
    export_unet(unet.eval(), single)
    model = onnx.load(str(single))
    split = tmp_path / "split"
    split.mkdir()
    onnx.save_model(model, str(split / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    entry = reg.add_artifacts(entry.ref, {"onnx": split / "m.onnx", "onnx_data0": split / "weights.bin"},
                              extra={"export": {"external_data": {"onnx_data0": "weights.bin"}}})
    return reg, entry, unet


def test_onnx_with_external_data_runs_from_verified_bytes_without_staging(home, tmp_path, monkeypatch):
    from medcfx.export import denoiser_for

    reg, entry, unet = _onnx_entry(home, tmp_path)
    stage_before = set(Path(tempfile.gettempdir()).glob("medcfx-onnx-*"))
    read = reg.read_verified

    def read_then_delete(e, role):  # what runs must be what was hashed: the file is gone after the read
        data, path = read(e, role)
        os.chmod(path, 0o644)
        path.unlink()
        return data, path

    monkeypatch.setattr(reg, "read_verified", read_then_delete)
    request = SimpleNamespace(registry=reg, extra={"backend": "onnx"}, device="cpu")
    den = denoiser_for(request, entry, unet)
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([0, 40, 99]), torch.tensor([0, 1, 2])
    np.testing.assert_allclose(den(x, t, {"y": y}).numpy(), unet(x, t, y).detach().numpy(), atol=1e-4)
    assert set(Path(tempfile.gettempdir()).glob("medcfx-onnx-*")) == stage_before


@pytest.mark.parametrize("name", ["../evil.bin", "/tmp/evil.bin", "sub/weights.bin", ".."])
def test_onnx_external_data_names_are_confined(home, tmp_path, name):
    from medcfx.export import verified_onnx_bytes

    reg, entry, _ = _onnx_entry(home, tmp_path)
    entry = reg.add_artifacts(entry.ref, {}, extra={"export": {"external_data": {"onnx_data0": name}}})
    with pytest.raises(IntegrityError, match="not a plain file name"):
        verified_onnx_bytes(reg, entry)
    assert not (tmp_path / "evil.bin").exists() and not Path("/tmp/evil.bin").exists()


@pytest.mark.parametrize("change", ["same size", "shorter"])
def test_export_of_a_modified_artifact_writes_no_archive(home, tmp_path, change):
    w = tmp_path / "w.safetensors"
    make_weights(w, 1)
    reg = Registry(home, bundled=False)
    entry = reg.register("m", "sanchez", {"weights": w})
    obj = reg.artifact_path(entry, "weights")
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    if change == "same size":
        data[-1] ^= 0xFF
    else:
        data = data[:-1]
    obj.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="weights of m:1"):
        reg.export("m", tmp_path / "m.tar.gz")
    assert not (tmp_path / "m.tar.gz").exists() and not list(tmp_path.glob(".medcfx-tmp-*"))
