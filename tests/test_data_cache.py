"""medcfx.data.cache: keys, hits that read nothing, rebuilds, atomic builds, untrusted entries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_data_helpers import truncate_gzip, write_brats, write_png

import medcfx.data.io as dio
from medcfx.data import cache as cachemod
from medcfx.data.preprocess import PreprocessConfig, prepare
from medcfx.data.sliceset import PREPROCESS_VERSION, SliceSet
from medcfx.errors import MedcfxError


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _forbid_reads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an input file was read")

    monkeypatch.setattr(nib, "load", boom)
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "open", boom)


def test_second_prepare_reads_no_input_file(tmp_path, home, monkeypatch):
    root = write_brats(tmp_path / "b", n=2)
    first = prepare(root, PreprocessConfig(size=8))
    imgs = np.asarray(first.images).copy()
    _forbid_reads(monkeypatch)
    second = prepare(root, PreprocessConfig(size=8))
    assert second.path == first.path and second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(np.asarray(second.images), imgs)
    assert first.path.parent == home / "cache"


def test_second_prepare_of_images_reads_nothing(tmp_path, home, monkeypatch):
    write_png(tmp_path / "normal" / "a.png", np.zeros((6, 6), np.uint8))
    write_png(tmp_path / "abnormal" / "b.png", np.full((6, 6), 9, np.uint8))
    prepare(tmp_path, PreprocessConfig(size=4))
    _forbid_reads(monkeypatch)
    assert len(prepare(tmp_path, PreprocessConfig(size=4))) == 2


def test_changed_input_or_config_gives_new_key(tmp_path, home):
    root = write_brats(tmp_path / "b", n=2)
    cfg = PreprocessConfig(size=8)
    k0 = prepare(root, cfg).fingerprint
    assert prepare(root, PreprocessConfig(size=8, percentile=98.0)).fingerprint != k0
    assert prepare(root, PreprocessConfig(size=8, modalities=("flair",))).fingerprint != k0
    f = root / "BraTS_001" / "BraTS_001_t2.nii.gz"
    before = prepare(root, cfg)
    old_t2 = np.asarray(before.images[before.case_rows("BraTS_001")])[:, 2].copy()
    img = nib.load(str(f))
    data = img.get_fdata().astype(np.float32)
    data[:, :10] *= 0.25  # different content (and size/mtime)
    nib.save(nib.Nifti1Image(data, img.affine), str(f))
    after = prepare(root, cfg)
    assert after.fingerprint != before.fingerprint
    new_t2 = np.asarray(after.images[after.case_rows("BraTS_001")])[:, 2]
    assert not np.allclose(new_t2, old_t2)  # rebuilt from the new file, not reused
    # touching a file (same bytes, new mtime) is enough to change the key
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert prepare(root, cfg).fingerprint not in (after.fingerprint, before.fingerprint)


def test_cache_key_is_canonical(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("x")
    k1 = cachemod.cache_key("brats", tmp_path, [a], {"size": 64, "p": 99.0}, 1)
    k2 = cachemod.cache_key("brats", tmp_path, [a], {"p": 99.0, "size": 64}, 1)
    assert k1 == k2 and len(k1) == 64
    assert cachemod.cache_key("brats", tmp_path, [a], {"size": 64, "p": 99.0}, 2) != k1
    assert cachemod.cache_key("folder", tmp_path, [a], {"size": 64, "p": 99.0}, 1) != k1
    a.write_text("xy")  # size changes
    assert cachemod.cache_key("brats", tmp_path, [a], {"size": 64, "p": 99.0}, 1) != k1


def test_error_in_case_7_leaves_nothing(tmp_path, home):
    root = write_brats(tmp_path / "b", n=8)
    bad = root / "BraTS_006" / "BraTS_006_flair.nii.gz"
    truncate_gzip(bad, 0.6)
    cache = home / "cache"
    seen = []
    with pytest.raises(MedcfxError) as e:
        prepare(root, PreprocessConfig(size=8), progress=lambda done, total, cid: seen.append(cid))
    assert str(e.value).startswith(f"cannot read {bad}")
    assert seen == [f"BraTS_{i:03d}" for i in range(6)]  # it really got to case 7 before failing
    assert _entries(cache) == []  # no entry, no temporary folder


def test_nan_in_a_case_leaves_nothing_and_old_entries_survive(tmp_path, home):
    root = write_brats(tmp_path / "b", n=3)
    good = prepare(root, PreprocessConfig(size=8))
    f = root / "BraTS_002" / "BraTS_002_t1.nii.gz"
    img = nib.load(str(f))
    d = img.get_fdata().astype(np.float32)
    d[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(d, img.affine), str(f))
    with pytest.raises(MedcfxError, match=r"BraTS_002_t1\.nii\.gz: holds 1 NaN"):
        prepare(root, PreprocessConfig(size=8))
    assert _entries(home / "cache") == [good.path.name]
    assert len(cachemod.open_entry(good.path, PREPROCESS_VERSION)[0]["cases"]) == 3


def test_index_not_matching_arrays_is_rebuilt(tmp_path, home, monkeypatch):
    root = write_brats(tmp_path / "b", n=2)
    ss = prepare(root, PreprocessConfig(size=8))
    n, entry = len(ss), ss.path
    ref = np.asarray(ss.images).copy()
    del ss
    # 1) labels array with the wrong number of rows
    np.save(entry / "labels.npy", np.zeros((n + 3, 1), np.float32))
    calls = []
    real = dio.read_volume

    def counting(p):
        calls.append(p)
        return real(p)

    import medcfx.data.preprocess as pp

    monkeypatch.setattr(pp, "read_volume", counting)
    ss = prepare(root, PreprocessConfig(size=8))
    assert calls, "a mismatching entry must be rebuilt, not trusted"
    assert len(ss) == n and ss.labels.shape == (n, 1)
    np.testing.assert_array_equal(np.asarray(ss.images), ref)
    # 2) index.json says another row count
    calls.clear()
    idx = json.loads((entry / "index.json").read_text())
    idx["n"] = n + 1
    (entry / "index.json").write_text(json.dumps(idx))
    prepare(root, PreprocessConfig(size=8))
    assert calls
    # 3) truncated images.npy
    calls.clear()
    raw = (entry / "images.npy").read_bytes()
    (entry / "images.npy").write_bytes(raw[: len(raw) // 2])
    ss = prepare(root, PreprocessConfig(size=8))
    assert calls and np.array_equal(np.asarray(ss.images), ref)
    # 4) index.json lists a case geometry that does not exist
    calls.clear()
    idx = json.loads((entry / "index.json").read_text())
    idx["cases"][0]["geometry"] = 99
    (entry / "index.json").write_text(json.dumps(idx))
    prepare(root, PreprocessConfig(size=8))
    assert calls
    with pytest.raises(MedcfxError, match="invalid preprocessed data"):
        (entry / "index.json").write_text(json.dumps(idx))
        SliceSet.open(entry)
    # 5) an entry without index.json (crashed build) is not trusted either
    calls.clear()
    (entry / "index.json").unlink()
    prepare(root, PreprocessConfig(size=8))
    assert calls


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCFX_CACHE", str(tmp_path / "c1"))
    monkeypatch.setenv("MEDCFX_HOME", str(tmp_path / "h"))
    assert cachemod.cache_root() == tmp_path / "c1"
    monkeypatch.delenv("MEDCFX_CACHE")
    assert cachemod.cache_root() == tmp_path / "h" / "cache"
    monkeypatch.delenv("MEDCFX_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cachemod.cache_root() == tmp_path / "home" / ".medcfx" / "cache"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("MEDCFX_CACHE", str(blocker / "sub"))
    with pytest.raises(MedcfxError, match=r"MEDCFX_CACHE"):
        cachemod.cache_root()


def test_explicit_cache_dir(tmp_path, home):
    root = write_brats(tmp_path / "b", n=1)
    ss = prepare(root, PreprocessConfig(size=8), cache_dir=tmp_path / "mycache")
    assert ss.path.parent == tmp_path / "mycache"
    assert _entries(home / "cache") == []


def test_npy_writer_streams_rows(tmp_path):
    w = cachemod.NpyWriter(tmp_path / "a.npy", np.float32, (2, 3))
    parts = [np.random.default_rng(i).random((i, 2, 3)) for i in (3, 0, 5, 1)]
    for p in parts:
        w.append(p)
    assert w.close() == (9, 2, 3)
    back = np.load(tmp_path / "a.npy", mmap_mode="r")
    np.testing.assert_array_equal(back, np.concatenate(parts).astype(np.float32))
    raw = (tmp_path / "a.npy").read_bytes()
    header_len = int.from_bytes(raw[8:10], "little")
    assert (10 + header_len) % 64 == 0


def test_moved_dataset_keeps_its_cache_and_references(tmp_path, home, monkeypatch):
    root = write_brats(tmp_path / "b", n=1)
    ss = prepare(root, PreprocessConfig(size=8))
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    _forbid_reads(monkeypatch)
    ss2 = prepare(moved, PreprocessConfig(size=8))  # same relative paths, sizes, mtimes: a hit
    assert ss2.path == ss.path
    assert ss2.reference("BraTS_000") == moved / "BraTS_000" / "BraTS_000_t1.nii.gz"
