"""medcfx.data.io on real-world files: the detection rule, gzip integrity, header-vs-file size, 4D channels,
and the Medical Segmentation Decathlon layout. Inputs are written here with nibabel / gzip / pydicom / Pillow."""

from __future__ import annotations

import gzip
import json
import math
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from test_data_helpers import affine_for, write_dicom, write_nii, write_png

from medcfx.data.io import is_image_file, load_nifti_header, read_any, read_image, read_volume, write_nifti
from medcfx.data.layouts import Layout, detect_kind, detect_layout, load_layout
from medcfx.errors import MedcfxError

# ---------------------------------------------------------------------------------------------------------
# one detection rule


def test_dicom_is_recognised_by_its_marker_whatever_the_suffix(tmp_path):
    pytest.importorskip("pydicom")
    s = np.arange(20, dtype=np.uint16).reshape(4, 5) * 100
    named = {n: write_dicom(tmp_path / n, s) for n in ("a.dcm", "b.dicom", "C.IMA", "d.ima", "IM0005", "odd.png")}
    png = write_png(tmp_path / "real.png", np.zeros((2, 3), np.uint8))
    for f in named.values():
        assert is_image_file(f)
        im = read_image(f)
        assert im.meta["format"] == "dicom" and im.shape == (1, 4, 5)
        np.testing.assert_array_equal(read_any(f).data[0], s)
    assert read_image(png).meta["format"] == "png"
    (tmp_path / "notes").write_text("plain text, no marker")
    assert not is_image_file(tmp_path / "notes") and not is_image_file(tmp_path / "v.nii.gz")
    with pytest.raises(MedcfxError, match=r"IM0005: a DICOM file where a volume is expected; .*DICOM series folder"):
        read_volume(named["IM0005"])


# ---------------------------------------------------------------------------------------------------------
# gzip integrity


def _vol(seed=0, shape=(24, 20, 16)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_untouched_nii_gz_reads_bitwise_as_nibabel(tmp_path):
    f = write_nii(tmp_path / "a.nii.gz", _vol())
    raw = (np.random.default_rng(1).random((6, 7, 8)) * 3000).astype(np.int16)
    img = nib.Nifti1Image(raw, affine_for(2))
    img.header.set_slope_inter(0.25, -7.0)
    g = tmp_path / "scaled.nii.gz"
    nib.save(img, str(g))
    for p in (f, g):
        ours, theirs = read_volume(p), nib.load(str(p))
        assert ours.data.tobytes() == theirs.get_fdata(dtype=np.float32).tobytes()
        np.testing.assert_array_equal(ours.affine, theirs.affine)


def test_flipped_bytes_mid_stream_are_a_corrupt_gzip_stream(tmp_path):
    f = write_nii(tmp_path / "a.nii.gz", _vol())
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])
    f.write_bytes(bytes(raw))
    with pytest.raises(MedcfxError) as e:
        read_volume(f)
    assert str(e.value).startswith(f"cannot read {f}: corrupt gzip stream (") and "\n" not in str(e.value)


def test_a_wrong_crc_that_nibabel_never_checks_is_refused(tmp_path):
    data = _vol(3)
    f = write_nii(tmp_path / "crc.nii.gz", data)
    raw = bytearray(f.read_bytes())
    raw[-8:-4] = bytes(b ^ 0xFF for b in raw[-8:-4])  # CRC32 field of the gzip trailer
    f.write_bytes(bytes(raw))
    np.testing.assert_array_equal(nib.load(str(f)).get_fdata(dtype=np.float32), data)  # nibabel: no complaint
    with pytest.raises(MedcfxError, match=r"corrupt gzip stream \(BadGzipFile: CRC check failed"):
        read_volume(f)
    g = write_nii(tmp_path / "isize.nii.gz", data)
    raw = bytearray(g.read_bytes())
    raw[-4:] = b"\0\0\0\0"  # ISIZE 0: the cheap check suspects it, the full decompression says why
    g.write_bytes(bytes(raw))
    with pytest.raises(MedcfxError, match=r"isize\.nii\.gz: corrupt gzip stream \(BadGzipFile: Incorrect length"):
        read_volume(g)


# ---------------------------------------------------------------------------------------------------------
# header-declared size against the file


def _header_only(cls, shape, dtype) -> bytes:
    hdr = cls()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_data_offset(hdr.single_vox_offset)
    blob = hdr.binaryblock
    return blob + b"\0" * (hdr.single_vox_offset - len(blob)) + b"\0" * 100


@pytest.mark.parametrize("cls,shape,dtype,suffix", [
    (nib.Nifti1Header, (20000, 20000, 1), np.float32, ".nii"),
    (nib.Nifti1Header, (20000, 20000, 1), np.float32, ".nii.gz"),
    (nib.Nifti2Header, (100000, 100000, 1), np.int16, ".nii"),
    (nib.Nifti2Header, (100000, 100000, 1), np.int16, ".nii.gz"),
])
def test_a_header_declaring_more_than_the_file_holds_is_refused_before_allocating(tmp_path, cls, shape, dtype, suffix):
    blob = _header_only(cls, shape, dtype)
    f = tmp_path / f"huge{suffix}"
    f.write_bytes(gzip.compress(blob) if suffix == ".nii.gz" else blob)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    tracemalloc.start()
    try:
        for reader in (read_volume, load_nifti_header):
            with pytest.raises(MedcfxError) as e:
                reader(f)
            msg = str(e.value)
            assert msg.startswith(f"{f}: header declares {shape} {np.dtype(dtype)} ({nbytes} bytes of voxel data) "
                                  f"but the file holds only {f.stat().st_size} ")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # nothing near the declared size was allocated


def test_a_real_stream_shorter_than_declared_is_counted_not_allocated(tmp_path):
    # 1 MiB of incompressible voxels under a header declaring 2 MiB: only the decompressed length can tell
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((128, 128, 32))
    hdr.set_data_dtype(np.float32)
    hdr.set_data_offset(352)
    payload = np.random.default_rng(0).bytes(2**20)
    f = tmp_path / "short.nii.gz"
    f.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + payload))
    with pytest.raises(MedcfxError, match=rf"short\.nii\.gz: header declares \(128, 128, 32\) float32 \(2097152 bytes of "
                                          rf"voxel data\) but the file holds only {352 + 2**20} bytes decompressed"):
        read_volume(f)


# ---------------------------------------------------------------------------------------------------------
# 4D files: one channel at a time


def test_4d_file_needs_a_frame_and_frame_i_is_channel_i(tmp_path):
    raw = (np.random.default_rng(2).random((5, 6, 7, 4)) * 1000).astype(np.int16)
    img = nib.Nifti1Image(raw, affine_for(1))
    img.header.set_slope_inter(0.5, 3.0)
    f = tmp_path / "BRATS_001.nii.gz"
    nib.save(img, str(f))
    with pytest.raises(MedcfxError, match=r"BRATS_001\.nii\.gz: expected a 3D volume, got shape \(5, 6, 7, 4\) \(4D: 4 "
                                          r"channels .*a dataset layout must name its channels"):
        read_volume(f)
    for i in range(4):
        v = read_volume(f, frame=i)
        assert v.shape == (5, 6, 7) and v.meta["frame"] == i and v.meta["dtype"] == "int16" and v.data.flags.writeable
        np.testing.assert_allclose(v.data, raw[..., i] * 0.5 + 3.0)
        np.testing.assert_array_equal(v.affine, nib.load(str(f)).affine)
    with pytest.raises(MedcfxError, match=r"has 4 channel\(s\) along the 4th axis; frame 4 does not exist"):
        read_volume(f, frame=4)
    three = write_nii(tmp_path / "three.nii.gz", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(MedcfxError, match=r"three\.nii\.gz: holds a 3D volume .* no frame 1"):
        read_volume(three, frame=1)
    out = write_nifti(tmp_path / "out.nii.gz", v.data * 2, like=v)  # the frame's volume is a valid output grid
    back = nib.load(str(out))
    assert back.shape == (5, 6, 7)
    np.testing.assert_array_equal(back.affine, v.affine)
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), v.data * 2)


# ---------------------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon


def _decathlon(root, n_train=2, test=("BRATS_485",), names=("FLAIR", "T1w", "t1gd", "T2w")):
    rng = np.random.default_rng(5)
    arrays = {}
    for i in range(1, n_train + 1):
        arr = rng.random((6, 5, 4, len(names))).astype(np.float32)
        arrays[f"BRATS_{i:03d}"] = arr
        write_nii(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", arr)
        write_nii(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", (arr[..., 0] > 0.5).astype(np.uint8))
    for t in test:
        write_nii(root / "imagesTs" / f"{t}.nii.gz", rng.random((6, 5, 4, len(names))).astype(np.float32))
    meta = {"name": "BRATS", "modality": {str(i): n for i, n in enumerate(names)},
            "labels": {"0": "background", "1": "edema"}, "numTraining": n_train,
            "training": [{"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"}
                         for i in range(1, n_train + 1)],
            "test": [f"./imagesTs/{t}.nii.gz" for t in test]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return arrays


def test_decathlon_layout_channels_are_frames_in_the_requested_order(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    arrays = _decathlon(root)
    assert detect_kind(root) == "decathlon" and detect_kind(root / "dataset.json") == "decathlon"
    lay = detect_layout(root)
    assert isinstance(lay, Layout) and lay.kind == "decathlon" and lay.problems == [] and lay.dims == 3
    assert lay.channels == ["t1", "t1ce", "t2", "flair"] and lay.label_names == ["unhealthy"]
    assert [c.id for c in lay.cases] == ["BRATS_001", "BRATS_002", "BRATS_485"]
    c1 = lay.cases[0]
    assert c1.channels == [root / "imagesTr" / "BRATS_001.nii.gz"] * 4 and c1.frames == [1, 2, 3, 0]
    assert c1.mask == root / "labelsTr" / "BRATS_001.nii.gz" and math.isnan(c1.labels["unhealthy"])
    test_case = lay.cases[2]
    assert test_case.mask is None and test_case.split == "test" and test_case.frames == [1, 2, 3, 0]
    for ch, (path, frame) in enumerate(zip(c1.channels, c1.frames)):
        v = read_volume(path, frame=frame)  # float32 on disk, no scaling: still a writable array of its own
        np.testing.assert_array_equal(v.data, arrays["BRATS_001"][..., [1, 2, 3, 0][ch]])
        # writable, and in the same (Fortran) memory order as nibabel gives a 3D file: reductions over it round alike
        assert v.data.flags.writeable and v.data.flags.f_contiguous == read_volume(root / "labelsTr" / "BRATS_001.nii.gz").data.flags.f_contiguous
    assert lay.files() == sorted({root / "dataset.json", root / "imagesTs" / "BRATS_485.nii.gz"}
                                 | {root / d / f"BRATS_00{i}.nii.gz" for d in ("imagesTr", "labelsTr") for i in (1, 2)})
    lay = load_layout(root, "decathlon", modalities=["flair", "t1"])
    assert lay.channels == ["flair", "t1"] and lay.cases[0].frames == [0, 1] and len(lay.cases[0].channels) == 2


def test_decathlon_missing_listed_files_are_problems_and_non_mri_channels_all_used(tmp_path):
    root = tmp_path / "Task05_Prostate"
    _decathlon(root, n_train=3, test=(), names=("T2", "ADC"))
    (root / "imagesTr" / "BRATS_002.nii.gz").unlink()
    (root / "labelsTr" / "BRATS_003.nii.gz").unlink()
    lay = detect_layout(root)
    assert lay.kind == "decathlon" and lay.channels == ["T2", "ADC"]
    assert [c.id for c in lay.cases] == ["BRATS_001", "BRATS_003"] and lay.cases[0].frames == [0, 1]
    assert lay.cases[1].mask is None
    probs = "\n".join(lay.problems)
    assert "dataset.json training[1]: image ./imagesTr/BRATS_002.nii.gz not found" in probs
    assert "dataset.json training[2]: label ./labelsTr/BRATS_003.nii.gz not found" in probs
    assert any("not all MRI modalities" in i for i in lay.info)


def test_single_channel_decathlon_is_3d_and_nnunet_v1_with_a_training_list_stays_nnunet(tmp_path):
    root = tmp_path / "Task02_Heart"
    arrays = _decathlon(root, test=(), names=("MRI",))
    lay = detect_layout(root)
    assert lay.kind == "decathlon" and lay.cases[0].frames is None and lay.cases[0].channels == [root / "imagesTr" / "BRATS_001.nii.gz"]
    np.testing.assert_array_equal(read_volume(lay.cases[0].channels[0]).data, arrays["BRATS_001"][..., 0])
    # nnU-Net v1: dataset.json lists ./imagesTr/X.nii.gz, the files on disk are X_0000.nii.gz ...
    v1 = tmp_path / "Task500_v1"
    for i in range(2):
        write_nii(v1 / "imagesTr" / f"case_{i:03d}_0000.nii.gz", np.zeros((3, 4, 5), np.float32))
    meta = {"modality": {"0": "CT"}, "training": [{"image": f"./imagesTr/case_{i:03d}.nii.gz"} for i in range(2)]}
    (v1 / "dataset.json").write_text(json.dumps(meta))
    lay = detect_layout(v1)
    assert lay.kind == "nnunet" and [c.id for c in lay.cases] == ["case_000", "case_001"] and lay.cases[0].frames is None
