"""Tests for medcfx.registry and the `models` CLI sub-app, on real safetensors files in tmp folders.

Digests are recomputed here with hashlib over the raw file bytes (independently of sha256_file), and
expected object locations are spelled out from the documented layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from typer.testing import CliRunner

import medcfx
from medcfx.cli_models import get_registry, models_app
from medcfx.errors import IntegrityError, MedcfxError
from medcfx.registry import Entry, Registry, bundled_catalogue_path, sha256_file, validate_name


# ------------------------------------------------------------------------------------------ helpers
def make_weights(path: Path, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}
    save_file(tensors, str(path))
    return tensors


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def object_file(home: Path, digest: str, suffix: str) -> Path:
    return home / "objects" / "sha256" / digest[:2] / f"{digest}{suffix}"


def flip_byte(path: Path, offset: int = -1) -> None:
    os.chmod(path, 0o644)  # stored objects are read-only
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def all_objects(home: Path) -> list[Path]:
    root = home / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "home", bundled=False)


# ---------------------------------------------------------------------------- register / resolve
def test_register_versions_resolve_and_load(reg: Registry, tmp_path: Path) -> None:
    w1, w2, w3 = tmp_path / "w1.safetensors", tmp_path / "w2.safetensors", tmp_path / "w3.safetensors"
    t1, t2, t3 = make_weights(w1, 1), make_weights(w2, 2), make_weights(w3, 3)
    e1 = reg.register("sanchez-demo", "sanchez", {"weights": w1}, config={"network": {"ch": 8}},
                      provenance={"seed": 1, "steps": 10}, metrics={"pixel_AUPRC": 0.25, "dice": 0.5},
                      tags=["demo"])
    e2 = reg.register("sanchez-demo", "sanchez", {"weights": w2})
    e3 = reg.register("other", "wolleb", {"weights": w3}, parent="sanchez-demo:1")

    assert (e1.version, e2.version, e3.version) == (1, 2, 1)
    assert e1.digest == sha(w1) and e2.digest == sha(w2)
    assert e1.ref == "sanchez-demo:1"
    stored = object_file(reg.home, sha(w1), ".safetensors")
    assert stored.read_bytes() == w1.read_bytes()
    assert e1.artifacts["weights"] == {"path": str(stored.relative_to(reg.home)), "sha256": sha(w1),
                                       "bytes": w1.stat().st_size}
    assert e1.provenance["medcfx_version"] == medcfx.__version__ and e1.provenance["seed"] == 1

    # latest, explicit version, digest prefix (upper case accepted)
    assert reg.resolve("sanchez-demo").version == 2
    assert reg.resolve("sanchez-demo:1").digest == sha(w1)
    assert reg.resolve("sha256:" + sha(w3)[:8].upper()).ref == "other:1"
    assert reg.resolve("other").parent == "sanchez-demo:1"
    assert [e.ref for e in reg.entries()] == ["other:1", "sanchez-demo:1", "sanchez-demo:2"]

    # the YAML on disk round-trips to the same entries, and a fresh Registry object sees them
    fresh = Registry(reg.home, bundled=False)
    assert fresh.resolve("sanchez-demo:1") == e1
    assert fresh.resolve("sanchez-demo:1").config == {"network": {"ch": 8}}
    assert list(fresh.resolve("sanchez-demo:1").metrics) == ["pixel_AUPRC", "dice"]  # order kept

    for ref, expected in (("sanchez-demo:1", t1), ("sanchez-demo", t2), ("other", t3)):
        loaded = reg.load_tensors(ref)
        assert set(loaded) == set(expected)
        for key in expected:
            assert torch.equal(loaded[key], expected[key])
    assert reg.artifact_path("sanchez-demo:1") == stored


def test_unknown_and_malformed_refs(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(MedcfxError, match="no models are registered"):
        reg.resolve("nothing")
    w = tmp_path / "w.safetensors"
    make_weights(w, 0)
    for name in ["m00", "m01", "m02", "m03", "m04", "m05", "m06", "m07", "m08", "m09", "m10", "m11"]:
        reg.register(name, "sanchez", {"weights": w})
    with pytest.raises(MedcfxError) as info:
        reg.resolve("zzz")
    message = str(info.value)
    assert message.startswith("unknown model 'zzz' (known: m00, m01,")
    assert "m09" in message and "m10" not in message and "2 more" in message and "\n" not in message
    with pytest.raises(MedcfxError, match=r"unknown model 'm00:5' \(versions of m00: 1\)"):
        reg.resolve("m00:5")
    with pytest.raises(MedcfxError, match="must be an integer"):
        reg.resolve("m00:latest")
    with pytest.raises(MedcfxError, match="at least 6 hex"):
        reg.resolve("sha256:" + sha(w)[:5])
    with pytest.raises(MedcfxError, match="at least 6 hex"):
        reg.resolve("sha256:zzzzzzzz")
    other = "0" * 64 if not sha(w).startswith("000000") else "f" * 64
    with pytest.raises(MedcfxError, match="unknown model"):
        reg.resolve("sha256:" + other[:10])
    with pytest.raises(MedcfxError, match="has no artifact 'onnx' \\(has: weights\\)"):
        reg.artifact_path("m00", "onnx")


def test_sha256_prefix_unique_and_ambiguous(reg: Registry, tmp_path: Path) -> None:
    # brute-force two safetensors payloads whose sha256 share the first 6 hex digits (birthday search)
    seen: dict[str, bytes] = {}
    pair = None
    for i in range(200_000):
        blob = st_save({"w": torch.tensor([float(i)])})
        digest = hashlib.sha256(blob).hexdigest()
        if digest[:6] in seen and seen[digest[:6]] != blob:
            pair = (seen[digest[:6]], blob)
            break
        seen[digest[:6]] = blob
    assert pair is not None
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(pair[0])
    b.write_bytes(pair[1])
    da, db = sha(a), sha(b)
    reg.register("alpha", "sanchez", {"weights": a})
    reg.register("beta", "sanchez", {"weights": b})
    common = next(i for i in range(64) if da[i] != db[i])
    assert common >= 6
    with pytest.raises(MedcfxError) as info:
        reg.resolve("sha256:" + da[:6])
    assert "ambiguous" in str(info.value) and "alpha:1" in str(info.value) and "beta:1" in str(info.value)
    assert reg.resolve("sha256:" + da[: common + 1]).ref == "alpha:1"
    assert reg.resolve("sha256:" + db[: common + 1]).ref == "beta:1"
    assert reg.resolve("sha256:" + db).ref == "beta:1"
    # the digest is the weights artifact's, not another role's
    extra = tmp_path / "grader.json"
    extra.write_text('{"k": 1}')
    e = reg.register("gamma", "sanchez", {"grader": extra, "weights": a})
    assert e.digest == da
    with pytest.raises(MedcfxError, match="ambiguous"):
        reg.resolve("sha256:" + da)  # alpha:1 and gamma:1 share their weights


# ------------------------------------------------------------------------------------- integrity
def test_tampered_object_is_detected(reg: Registry, tmp_path: Path) -> None:
    w, g = tmp_path / "w.safetensors", tmp_path / "grader.json"
    make_weights(w, 5)
    g.write_text(json.dumps({"thresholds": [0.1, 0.2]}))
    reg.register("m", "sanchez", {"weights": w})
    reg.register("m", "sanchez", {"weights": w, "grader": g})  # shares the weights object
    other = tmp_path / "o.safetensors"
    make_weights(other, 6)
    reg.register("n", "sanchez", {"weights": other})
    assert reg.verify() == []
    assert reg.load_json("m:2", "grader") == {"thresholds": [0.1, 0.2]}

    stored = object_file(reg.home, sha(w), ".safetensors")
    flip_byte(stored, offset=-3)  # a byte inside the tensor data: the header still parses
    with pytest.raises(IntegrityError) as info:
        reg.load_tensors("m:1")
    message = str(info.value)
    assert message.startswith(f"artifact weights of m:1 failed sha256 verification (expected {sha(w)[:12]}")
    assert f"got {sha(stored)[:12]}" in message and "corrupt or was modified" in message
    with pytest.raises(IntegrityError):
        reg.artifact_path("m:2")
    assert reg.artifact_path("m:2", verify=False) == stored
    problems = reg.verify()
    assert sorted(ref for ref, _ in problems) == ["m:1", "m:2"]
    assert all("failed sha256 verification" in p for _, p in problems)
    assert reg.verify("n") == []

    object_file(reg.home, sha(g), ".json").unlink()
    with pytest.raises(IntegrityError, match="artifact grader of m:2 is missing"):
        reg.load_json("m:2", "grader")
    assert sorted(ref for ref, _ in reg.verify("m:2")) == ["m:2", "m:2"]

    # re-registering the same content heals the corrupt object
    reg.register("m", "sanchez", {"weights": w})
    assert reg.verify("m:1") == []


def test_non_safetensors_weights_and_bad_json(reg: Registry, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\xff" * 40)
    reg.register("bogus", "sanchez", {"weights": bogus, "meta": bogus})
    with pytest.raises(MedcfxError, match="not a valid safetensors file") as info:
        reg.load_tensors("bogus")
    assert not isinstance(info.value, IntegrityError) and "\n" not in str(info.value)
    with pytest.raises(MedcfxError, match="not valid JSON"):
        reg.load_json("bogus", "meta")


def test_corrupt_registry_yaml(reg: Registry, tmp_path: Path) -> None:
    reg.home.mkdir(parents=True)
    reg.registry_file.write_text("schema: 1\nmodels: [ {name: x\n")
    with pytest.raises(MedcfxError) as info:
        reg.entries()
    assert str(reg.registry_file) in str(info.value) and "not valid YAML" in str(info.value)
    assert "\n" not in str(info.value)
    reg.registry_file.write_text("schema: 1\nmodels:\n- {name: x, version: 1, method: m}\n")
    with pytest.raises(MedcfxError, match="models\\[0\\].*no 'artifacts' field"):
        reg.resolve("x")


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one 1 MiB chunk, not a multiple of it
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name, rule", [
    ("../x", "path separator"), ("a/b", "path separator"), ("a\\b", "path separator"), ("", "empty"),
    ("x\n", "control character"), ("..", "'..'"), ("a..b", "'..'"), ("a b", "only letters"),
    ("x" * 101, "at most 100"), ("sha256", "reserved"), ("a:b", "only letters"),
])
def test_invalid_names_rejected(reg: Registry, tmp_path: Path, name: str, rule: str) -> None:
    w = tmp_path / "w.safetensors"
    make_weights(w, 0)
    with pytest.raises(MedcfxError) as info:
        reg.register(name, "sanchez", {"weights": w})
    assert rule in str(info.value) and "\n" not in str(info.value)
    assert reg.entries() == [] and all_objects(reg.home) == []


def test_valid_names_accepted() -> None:
    for name in ("sanchez-demo", "a", "M_1.2-b", "x" * 100):
        assert validate_name(name) == name


# --------------------------------------------------------------------------------------- bundled
def write_catalogue(repo: Path, weights_seed: int = 9) -> tuple[Path, Path, dict]:
    (repo / "models").mkdir(parents=True)
    weights = repo / "models" / "sanchez-demo.safetensors"
    tensors = make_weights(weights, weights_seed)
    catalogue = repo / "registry.yaml"
    catalogue.write_text(yaml.safe_dump({"schema": 1, "models": [{
        "name": "sanchez-demo", "version": 1, "method": "sanchez", "created": "2025-01-01T00:00:00Z",
        "artifacts": {"weights": {"path": "models/sanchez-demo.safetensors", "sha256": sha(weights),
                                  "bytes": weights.stat().st_size}},
        "metrics": {"pixel_AUPRC": 0.4}}]}, sort_keys=False))
    return catalogue, weights, tensors


def test_bundled_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalogue, weights, tensors = write_catalogue(tmp_path / "repo")
    monkeypatch.setenv("MEDCFX_BUNDLED_REGISTRY", str(catalogue))
    assert bundled_catalogue_path() == catalogue
    reg = Registry(tmp_path / "home")  # default: the catalogue named by the environment
    assert reg.bundled_path == catalogue

    [entry] = reg.entries()
    assert entry.bundled and entry.ref == "sanchez-demo:1" and entry.digest == sha(weights)
    assert "bundled" not in entry.to_dict()
    assert reg.resolve("sha256:" + sha(weights)[:10]) == entry
    assert reg.artifact_path("sanchez-demo") == weights
    loaded = reg.load_tensors("sanchez-demo")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert reg.verify() == []

    with pytest.raises(MedcfxError, match="bundled model .* cannot be removed"):
        reg.remove("sanchez-demo:1")
    with pytest.raises(MedcfxError, match="read-only"):
        reg.add_artifacts("sanchez-demo:1", {}, extra={"metrics": {"x": 1}})

    # a user version of the same name continues the numbering; the bundled one stays listed
    w2 = tmp_path / "w2.safetensors"
    make_weights(w2, 10)
    mine = reg.register("sanchez-demo", "sanchez", {"weights": w2})
    assert mine.version == 2 and not mine.bundled
    assert [(e.ref, e.bundled) for e in reg.entries()] == [("sanchez-demo:1", True), ("sanchez-demo:2", False)]
    assert reg.resolve("sanchez-demo").version == 2
    user_yaml = yaml.safe_load(reg.registry_file.read_text())
    assert [m["version"] for m in user_yaml["models"]] == [2]  # bundled entries are never copied

    flip_byte(weights, offset=-2)
    with pytest.raises(IntegrityError, match="artifact weights of sanchez-demo:1 failed sha256"):
        reg.load_tensors("sanchez-demo:1")
    assert [ref for ref, _ in reg.verify()] == ["sanchez-demo:1"]

    monkeypatch.setenv("MEDCFX_BUNDLED_REGISTRY", str(tmp_path / "missing.yaml"))
    with pytest.raises(MedcfxError, match="MEDCFX_BUNDLED_REGISTRY"):
        bundled_catalogue_path()
    assert Registry(tmp_path / "home", bundled=False).bundled_path is None


def test_default_bundled_catalogue_location(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDCFX_BUNDLED_REGISTRY", raising=False)
    repo_catalogue = Path(medcfx.__file__).resolve().parent.parent / "registry.yaml"
    installed = Path(sys.prefix) / "share" / "medcfx" / "registry.yaml"
    expected = repo_catalogue if repo_catalogue.is_file() else (installed if installed.is_file() else None)
    assert bundled_catalogue_path() == expected


# ----------------------------------------------------------------------------------- concurrency
WORKER = """
import sys, time
from pathlib import Path
from medcfx.registry import Registry
home, src, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
e = Registry(home, bundled=False).register("shared", "sanchez", {"weights": src}, provenance={"src": src})
print(e.version)
"""


def test_concurrent_registration_loses_nothing(tmp_path: Path) -> None:
    home, go = tmp_path / "home", tmp_path / "go"
    sources = []
    for i in range(8):
        path = tmp_path / f"w{i}.safetensors"
        make_weights(path, i % 4)  # pairs of identical content: the same object is written concurrently
        sources.append(path)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(home), str(src), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for src in sources]
    time.sleep(0.3)
    go.touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert sorted(int(out) for out, _ in outputs) == list(range(1, 9))

    reg = Registry(home, bundled=False)
    entries = reg.entries()
    assert [e.version for e in entries] == list(range(1, 9))
    assert sorted(e.provenance["src"] for e in entries) == sorted(str(s) for s in sources)
    for e in entries:  # each entry points at the content of the file it was registered from
        assert e.digest == sha(Path(e.provenance["src"]))
    assert reg.verify() == []
    assert len(all_objects(home)) == 4  # identical content stored once
    assert not list(home.rglob("*.tmp"))


# ---------------------------------------------------------------------------------- export/import
def test_export_import_round_trip(reg: Registry, tmp_path: Path) -> None:
    w, g = tmp_path / "w.safetensors", tmp_path / "grader.json"
    tensors = make_weights(w, 3)
    g.write_text(json.dumps({"levels": [0, 1, 2]}))
    for _ in range(2):
        reg.register("ae", "sanchez", {"weights": w})
    src = reg.register("ae", "sanchez", {"weights": w, "grader": g}, config={"diffusion": {"T": 100}},
                       provenance={"seed": 7, "data_fingerprint": "abc"}, metrics={"image_AUROC": 0.9},
                       tags=["x", "y"], parent="base:1")
    reg.add_artifacts("ae:3", {}, extra={"export": {"opset": 17}})
    for suffix in (".tar", ".tar.gz"):
        out = reg.export("ae:3", tmp_path / f"ae{suffix}")
        with tarfile.open(out) as tar:
            assert sorted(tar.getnames()) == ["artifacts/grader.json", "artifacts/weights.safetensors",
                                              "entry.yaml"]

    other = Registry(tmp_path / "home2", bundled=False)
    other.register("ae", "sanchez", {"weights": g})  # "ae" already has version 1 there
    imported = other.import_(tmp_path / "ae.tar.gz")
    assert imported.ref == "ae:2"
    assert imported.provenance["imported_from"] == {"ref": "ae:3", "created": src.created}
    assert imported.provenance["seed"] == 7 and imported.provenance["medcfx_version"] == medcfx.__version__
    assert (imported.config, imported.metrics, imported.tags, imported.parent) == (
        {"diffusion": {"T": 100}}, {"image_AUROC": 0.9}, ["x", "y"], "base:1")
    assert imported.extra == {"export": {"opset": 17}}
    assert imported.digest == sha(w)
    loaded = other.load_tensors("ae:2")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert other.load_json("ae", "grader") == {"levels": [0, 1, 2]}
    assert other.verify() == []
    assert other.import_(tmp_path / "ae.tar").ref == "ae:3"


def _rewrite_tar(src: Path, dest: Path, change) -> None:
    """Copy a tar, letting change(name, data) -> (name, data) alter members."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for m in tin.getmembers():
            name, data = change(m.name, tin.extractfile(m).read())
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_import_refuses_modified_and_unsafe_archives(reg: Registry, tmp_path: Path) -> None:
    w = tmp_path / "w.safetensors"
    make_weights(w, 4)
    reg.register("m", "sanchez", {"weights": w})
    good = reg.export("m", tmp_path / "m.tar")
    target = Registry(tmp_path / "target", bundled=False)

    def modify(name: str, data: bytes):
        if name.startswith("artifacts/"):
            data = bytearray(data)
            data[-1] ^= 1
        return name, bytes(data)

    _rewrite_tar(good, tmp_path / "modified.tar", modify)
    with pytest.raises(IntegrityError, match="artifact weights failed sha256 verification.*nothing was imported"):
        target.import_(tmp_path / "modified.tar")
    assert target.entries() == [] and all_objects(target.home) == []

    _rewrite_tar(good, tmp_path / "evil.tar",
                 lambda n, d: ("../evil", d) if n.startswith("artifacts/") else (n, d))
    with pytest.raises(MedcfxError, match="unsafe member '../evil'"):
        target.import_(tmp_path / "evil.tar")
    _rewrite_tar(good, tmp_path / "abs.tar", lambda n, d: (str(tmp_path / "abs-evil"), d) if n != "entry.yaml"
                 else (n, d))
    with pytest.raises(MedcfxError, match="unsafe member"):
        target.import_(tmp_path / "abs.tar")

    with tarfile.open(good) as tin, tarfile.open(tmp_path / "link.tar", "w") as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m))
        link = tarfile.TarInfo("artifacts/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tout.addfile(link)
    with pytest.raises(MedcfxError, match="holds a link"):
        target.import_(tmp_path / "link.tar")

    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(MedcfxError, match="is not a tar archive"):
        target.import_(tmp_path / "junk.tar")
    assert target.entries() == [] and all_objects(target.home) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "abs-evil").exists()
    assert target.import_(good).ref == "m:1"  # the untouched archive still imports


# --------------------------------------------------------------------------- remove / add_artifacts
def test_remove_collects_unreferenced_objects(reg: Registry, tmp_path: Path) -> None:
    x, y = tmp_path / "x.safetensors", tmp_path / "y.json"
    make_weights(x, 1)
    y.write_text("{}")
    reg.register("a", "sanchez", {"weights": x})
    reg.register("b", "sanchez", {"weights": x, "grader": y})
    reg.register("b", "sanchez", {"weights": x})
    ox, oy = object_file(reg.home, sha(x), ".safetensors"), object_file(reg.home, sha(y), ".json")
    assert all_objects(reg.home) == sorted([ox, oy])

    assert reg.remove("b").ref == "b:2"  # a bare name removes the latest version
    assert [e.ref for e in reg.entries()] == ["a:1", "b:1"] and ox.exists() and oy.exists()
    reg.remove("a")
    assert ox.exists()  # still used by b:1
    reg.remove("sha256:" + sha(x)[:8])
    assert reg.entries() == [] and all_objects(reg.home) == []
    with pytest.raises(MedcfxError, match="no models are registered"):
        reg.remove("a")


def test_add_artifacts(reg: Registry, tmp_path: Path) -> None:
    w, onnx1, onnx2 = tmp_path / "w.safetensors", tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    make_weights(w, 2)
    onnx1.write_bytes(b"onnx-one")
    onnx2.write_bytes(b"onnx-two")
    reg.register("m", "sanchez", {"weights": w}, metrics={"a": 1, "nested": {"p": 1}})
    e = reg.add_artifacts("m", {"onnx": onnx1}, extra={"metrics": {"nested": {"q": 2}}, "export": {"ok": True}})
    assert e.artifacts["onnx"]["sha256"] == sha(onnx1)
    assert e.metrics == {"a": 1, "nested": {"p": 1, "q": 2}} and e.extra == {"export": {"ok": True}}
    assert reg.resolve("m:1") == e
    assert object_file(reg.home, sha(onnx1), ".onnx").read_bytes() == b"onnx-one"

    e = reg.add_artifacts("m:1", {"onnx": onnx2})  # replacing a role frees the old object
    assert not object_file(reg.home, sha(onnx1), ".onnx").exists()
    assert reg.artifact_path(e, "onnx").read_bytes() == b"onnx-two"
    with pytest.raises(MedcfxError, match="defines its digest"):
        reg.add_artifacts("m:1", {"weights": onnx1})
    with pytest.raises(MedcfxError, match="cannot be changed"):
        reg.add_artifacts("m:1", {}, extra={"version": 5})
    assert reg.verify() == [] and reg.resolve("m").digest == sha(w)


def test_entry_dict_round_trip() -> None:
    data = {"name": "n", "version": 3, "method": "m", "created": "2025-01-01T00:00:00Z", "parent": "p:1",
            "tags": ["t"], "artifacts": {"weights": {"path": "p", "sha256": "a" * 64, "bytes": 3}},
            "config": {"network": {"c": 1}}, "provenance": {"seed": 1}, "metrics": {"x": 0.5},
            "export": {"opset": 17}}
    entry = Entry.from_dict(data)
    assert entry.to_dict() == data and entry.extra == {"export": {"opset": 17}}
    with pytest.raises(MedcfxError, match="sha256 must be 64"):
        Entry.from_dict({**data, "artifacts": {"weights": {"path": "p", "sha256": "xyz", "bytes": 3}}})


# -------------------------------------------------------------------------------------------- CLI
def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """test root"""

    app.add_typer(models_app, name="models")
    return app


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "clihome"
    empty = tmp_path / "empty-catalogue.yaml"
    empty.write_text("")
    monkeypatch.setenv("MEDCFX_HOME", str(home))
    monkeypatch.setenv("MEDCFX_BUNDLED_REGISTRY", str(empty))
    return home


def test_cli_list_show_verify(cli_env: Path, tmp_path: Path) -> None:
    runner, app = CliRunner(), cli_app()
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []

    w1, w2 = tmp_path / "w1.safetensors", tmp_path / "w2.safetensors"
    make_weights(w1, 1)
    make_weights(w2, 2)
    reg = get_registry()
    assert reg.home == cli_env
    reg.register("m", "sanchez", {"weights": w1}, metrics={"pixel_AUPRC": 0.125, "dice": 0.5})
    reg.register("n", "wolleb", {"weights": w2})

    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["ref"] for r in rows] == ["m:1", "n:1"]
    m = rows[0]
    assert (m["name"], m["version"], m["method"], m["digest"], m["bytes"], m["bundled"]) == (
        "m", 1, "sanchez", sha(w1), w1.stat().st_size, False)
    assert m["key_metric"] == {"name": "pixel_AUPRC", "value": 0.125} and rows[1]["key_metric"] is None
    assert m["created"].endswith("Z") and m["size"].endswith("B")

    table = runner.invoke(app, ["models", "list"])
    assert table.exit_code == 0 and "m:1" in table.stdout and sha(w1)[:12] in table.stdout
    assert "pixel_AUPRC=0.125" in table.stdout

    shown = runner.invoke(app, ["models", "show", "sha256:" + sha(w2)[:8], "--json"])
    assert shown.exit_code == 0
    record = json.loads(shown.stdout)
    assert record["ref"] == "n:1" and record["artifacts"]["weights"]["file"] == str(
        object_file(cli_env, sha(w2), ".safetensors"))
    shown_yaml = runner.invoke(app, ["models", "show", "m"])
    assert yaml.safe_load(shown_yaml.stdout)["metrics"] == {"pixel_AUPRC": 0.125, "dice": 0.5}

    ok = runner.invoke(app, ["models", "verify"])
    assert ok.exit_code == 0 and ok.stdout.count("OK") == 2

    flip_byte(object_file(cli_env, sha(w1), ".safetensors"))
    (object_file(cli_env, sha(w2), ".safetensors")).unlink()
    bad = runner.invoke(app, ["models", "verify"])
    assert bad.exit_code == 3
    assert "FAIL m:1" in bad.stdout and "FAIL n:1" in bad.stdout and "OK" not in bad.stdout
    assert "2 of 2 model(s) failed verification" in bad.stderr
    assert runner.invoke(app, ["models", "verify", "n:1"]).exit_code == 3

    unknown = runner.invoke(app, ["models", "show", "nope"])
    assert isinstance(unknown.exception, MedcfxError) and "unknown model 'nope'" in str(unknown.exception)


def test_cli_rm_import_export(cli_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner, app = CliRunner(), cli_app()
    w = tmp_path / "w.safetensors"
    make_weights(w, 1)
    reg = get_registry()
    reg.register("m", "sanchez", {"weights": w})
    reg.register("m", "sanchez", {"weights": w})

    refused = runner.invoke(app, ["models", "rm", "m:1"])  # CliRunner's stdin is not a terminal
    assert isinstance(refused.exception, MedcfxError) and "--yes" in str(refused.exception)
    assert len(reg.entries()) == 2

    monkeypatch.setattr("medcfx.cli_models._interactive", lambda: True)
    declined = runner.invoke(app, ["models", "rm", "m:1"], input="n\n")
    assert declined.exit_code == 1 and len(reg.entries()) == 2
    accepted = runner.invoke(app, ["models", "rm", "m:1"], input="y\n")
    assert accepted.exit_code == 0 and [e.ref for e in reg.entries()] == ["m:2"]

    out = tmp_path / "m.tgz"
    exported = runner.invoke(app, ["models", "export", "m", str(out)])
    assert exported.exit_code == 0 and out.is_file()
    bad_suffix = runner.invoke(app, ["models", "export", "m", str(tmp_path / "m.zip")])
    assert isinstance(bad_suffix.exception, MedcfxError)
    imported = runner.invoke(app, ["models", "import", str(out)])
    assert imported.exit_code == 0 and "imported m:3 (was m:2" in imported.stdout
    removed = runner.invoke(app, ["models", "rm", "m", "--yes"])
    assert removed.exit_code == 0 and [e.ref for e in reg.entries()] == ["m:2"]


def test_get_registry_checks_medcfx_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("MEDCFX_HOME", str(not_a_folder))
    with pytest.raises(MedcfxError, match="MEDCFX_HOME=.* is not a folder"):
        get_registry()
    monkeypatch.setenv("MEDCFX_HOME", str(tmp_path / "not-yet"))
    assert get_registry().home == tmp_path / "not-yet" and not (tmp_path / "not-yet").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("MEDCFX_HOME", str(locked))
    try:
        if os.access(locked, os.W_OK):  # running as root: permission bits are not enforced
            pytest.skip("permission bits are not enforced for this user")
        with pytest.raises(MedcfxError, match="MEDCFX_HOME=.* is not writable"):
            get_registry()
    finally:
        locked.chmod(0o700)


def test_hand_edited_path_outside_store_is_refused(reg: Registry, tmp_path: Path) -> None:
    w = tmp_path / "w.safetensors"
    make_weights(w, 1)
    reg.register("m", "sanchez", {"weights": w})
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(w.read_bytes())  # same bytes, so only the location rule can catch it
    data = yaml.safe_load(reg.registry_file.read_text())
    data["models"][0]["artifacts"]["weights"]["path"] = "../outside.safetensors"
    reg.registry_file.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(IntegrityError, match="not a relative path inside"):
        reg.load_tensors("m")
    reg.remove("m")
    assert outside.exists()  # garbage collection never deletes outside objects/


def test_metric_values_are_stored_as_plain_numbers(reg: Registry, tmp_path: Path) -> None:
    import numpy as np

    w = tmp_path / "w.safetensors"
    make_weights(w, 1)
    e = reg.register("m", "sanchez", {"weights": w}, metrics={"auc": np.float64(0.75), "t": torch.tensor(0.25)},
                     config={"size": (64, 64), "root": tmp_path})
    stored = yaml.safe_load(reg.registry_file.read_text())["models"][0]
    assert stored["metrics"] == {"auc": 0.75, "t": 0.25} and type(stored["metrics"]["auc"]) is float
    assert stored["config"] == {"size": [64, 64], "root": str(tmp_path)} and e.config == stored["config"]
    with pytest.raises(MedcfxError, match="metrics.x holds a"):
        reg.register("m", "sanchez", {"weights": w}, metrics={"x": object()})
    with pytest.raises(MedcfxError, match="metrics.v holds a Tensor"):
        reg.register("m", "sanchez", {"weights": w}, metrics={"v": torch.zeros(3)})
    assert [x.ref for x in reg.entries()] == ["m:1"]


def test_derive_makes_a_new_version_with_the_same_verified_artifacts(tmp_path: Path) -> None:
    """A calibration (or any added field) becomes a new version whose parent is the old one; a bundled model's
    artifacts are copied into the user's store so the new version can live there."""
    cat = tmp_path / "cat"
    (cat / "models").mkdir(parents=True)
    weights = make_weights(cat / "models" / "b.safetensors", 5)
    record = {"path": "models/b.safetensors", "sha256": sha(cat / "models" / "b.safetensors"),
              "bytes": (cat / "models" / "b.safetensors").stat().st_size}
    (cat / "registry.yaml").write_text(yaml.safe_dump({"schema": 1, "models": [
        {"name": "b", "version": 1, "method": "sanchez", "created": "x", "artifacts": {"weights": record},
         "config": {"preprocess": {"size": 48, "intensity": "percentile"}}, "metrics": {"pixel_AUPRC": 0.5},
         "tags": ["demo"]}]}))
    reg = Registry(tmp_path / "home", bundled=cat / "registry.yaml")
    new = reg.derive("b", {"calibration": {"threshold_fpr": 0.25, "fpr": 0.05}})
    assert new.ref == "b:2" and new.parent == "b:1" and not new.bundled
    assert new.extra["calibration"] == {"threshold_fpr": 0.25, "fpr": 0.05}
    assert new.digest == record["sha256"] and new.config == reg.resolve("b:1").config
    assert new.metrics == {"pixel_AUPRC": 0.5} and new.tags == ["demo"]
    assert reg.resolve("b").ref == "b:2"  # the newest version is what `--model b` uses
    loaded = reg.load_tensors("b")
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    # deriving again replaces the calibration in the next version, and shares the stored object
    again = reg.derive("b", {"calibration": {"threshold_fpr": 0.3}})
    assert again.ref == "b:3" and again.parent == "b:2" and again.extra["calibration"]["threshold_fpr"] == 0.3
    assert again.artifacts["weights"]["path"] == new.artifacts["weights"]["path"]
    with pytest.raises(MedcfxError, match="cannot be set"):
        reg.derive("b", {"artifacts": {}})
    # a bundled artifact that was modified is not copied
    os.chmod(cat / "models" / "b.safetensors", 0o644)
    (cat / "models" / "b.safetensors").write_bytes(b"x" * record["bytes"])
    with pytest.raises(IntegrityError):
        reg.derive("b:1", {"calibration": {}})
