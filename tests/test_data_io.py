"""medcfx.data.io: NIfTI, PNG/TIFF/npy and DICOM readers, atomic NIfTI writer, one-line errors."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest
from test_data_helpers import affine_for, truncate_gzip, write_dicom, write_nii, write_png

from medcfx.data.io import read_any, read_image, read_volume, write_nifti
from medcfx.errors import MedcfxError


# ---------------------------------------------------------------------------------------------------------
# NIfTI


def test_read_volume_keeps_affine_header_dtype_and_scaling(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(raw, affine_for(3))
    img.header.set_slope_inter(0.5, 10.0)  # stored int16 with scaling: value = 0.5 * raw + 10
    img.header.set_zooms((1.2, 0.9, 2.0))
    f = tmp_path / "v.nii.gz"
    nib.save(img, str(f))
    v = read_volume(f)
    assert v.data.dtype == np.float32 and v.shape == (4, 5, 6)
    np.testing.assert_allclose(v.data, 0.5 * raw + 10.0)
    np.testing.assert_allclose(v.affine, affine_for(3), atol=1e-6)  # NIfTI stores the sform as float32
    assert v.meta["dtype"] == "int16"
    assert v.zooms == pytest.approx((1.2, 0.9, 2.0))


def test_read_volume_uncompressed_and_trailing_singleton(tmp_path):
    data = np.random.default_rng(0).random((4, 5, 6, 1)).astype(np.float32)
    f = write_nii(tmp_path / "v.nii", data)
    v = read_volume(f)
    assert v.shape == (4, 5, 6)
    np.testing.assert_array_equal(v.data, data[..., 0])


def test_4d_volume_is_an_error_naming_file_and_shape(tmp_path):
    f = write_nii(tmp_path / "four.nii.gz", np.zeros((4, 5, 6, 3), np.float32))
    with pytest.raises(MedcfxError) as e:
        read_volume(f)
    msg = str(e.value)
    assert "four.nii.gz" in msg and "(4, 5, 6, 3)" in msg and "4D" in msg and "\n" not in msg


def test_nan_volume_is_an_error(tmp_path):
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    f = write_nii(tmp_path / "nan.nii.gz", data)
    with pytest.raises(MedcfxError, match=r"nan\.nii\.gz: holds 2 NaN or inf"):
        read_volume(f)


def test_truncated_gzip_is_cannot_read(tmp_path):
    f = write_nii(tmp_path / "t.nii.gz", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))
    truncate_gzip(f, 0.5)
    with pytest.raises(MedcfxError) as e:
        read_volume(f)
    assert str(e.value).startswith(f"cannot read {f}: ")
    assert "\n" not in str(e.value)


def test_garbage_file_is_cannot_read(tmp_path):
    f = tmp_path / "junk.nii.gz"
    f.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(MedcfxError, match=r"cannot read .*junk\.nii\.gz: "):
        read_volume(f)
    g = tmp_path / "junk.nii"
    g.write_bytes(b"\0" * 100)
    with pytest.raises(MedcfxError, match=r"cannot read .*junk\.nii: "):
        read_volume(g)


def test_missing_file(tmp_path):
    with pytest.raises(MedcfxError, match="no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_write_nifti_roundtrip_on_input_grid_atomic(tmp_path):
    raw = (np.random.default_rng(1).random((6, 7, 8)) * 1000).astype(np.int16)
    img = nib.Nifti1Image(raw, affine_for(2))
    img.header.set_slope_inter(2.0, -5.0)
    img.header["descrip"] = b"source scan"
    src = tmp_path / "src.nii.gz"
    nib.save(img, str(src))
    like = read_volume(src)
    out_arr = np.random.default_rng(2).standard_normal((6, 7, 8)).astype(np.float32)
    out = write_nifti(tmp_path / "sub" / "out.nii.gz", out_arr, like=like)
    back = nib.load(str(out))
    np.testing.assert_array_equal(back.affine, like.affine)
    assert back.get_data_dtype() == np.float32
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), out_arr)  # scaling reset: exact values
    assert back.header["descrip"].tobytes().startswith(b"source scan")
    assert back.header.get_qform(coded=True)[1] == img.header.get_qform(coded=True)[1]
    # like= a path works too (header only), and no temporary files are left behind
    out2 = write_nifti(tmp_path / "out2.nii", out_arr, like=src)
    np.testing.assert_array_equal(nib.load(str(out2)).affine, like.affine)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.nii.gz"]


def test_write_nifti_shape_mismatch(tmp_path):
    src = write_nii(tmp_path / "s.nii.gz", np.zeros((4, 5, 6), np.float32))
    with pytest.raises(MedcfxError, match=r"does not match the input grid \(4, 5, 6\)"):
        write_nifti(tmp_path / "o.nii.gz", np.zeros((4, 5, 7)), like=src)
    assert not (tmp_path / "o.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------------
# 2D images


def test_png_8bit_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    im = read_image(write_png(tmp_path / "g.png", g))
    assert im.data.shape == (1, 9, 11) and im.data.dtype == np.float32
    np.testing.assert_array_equal(im.data[0], g)
    assert im.meta["bit_depth"] == 8 and im.meta["integer"]
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    im = read_image(write_png(tmp_path / "c.png", rgb))
    assert im.data.shape == (3, 9, 11)
    np.testing.assert_array_equal(np.moveaxis(im.data, 0, -1), rgb)


def test_png_16bit_grey_keeps_raw_values(tmp_path):
    a = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    im = read_image(write_png(tmp_path / "g16.png", a))
    assert im.meta["bit_depth"] == 16 and im.meta["integer"]
    np.testing.assert_array_equal(im.data[0], a.astype(np.float32))
    assert im.data.max() == a.max() > 255


def test_rgba_drops_alpha_with_note_and_palette(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    im = read_image(write_png(tmp_path / "a.png", rgba))
    assert im.data.shape == (3, 5, 6)
    np.testing.assert_array_equal(np.moveaxis(im.data, 0, -1), rgba[..., :3])
    assert any("alpha" in n for n in im.meta["notes"])
    from PIL import Image

    p = Image.fromarray(rgba[..., :3]).convert("P")
    p.save(tmp_path / "p.png")
    im = read_image(tmp_path / "p.png")
    assert im.data.shape == (3, 5, 6) and any("palette" in n for n in im.meta["notes"])
    np.testing.assert_array_equal(np.moveaxis(im.data, 0, -1), np.asarray(p.convert("RGB")))


def test_tiff_16bit_and_float(tmp_path):
    from PIL import Image

    a = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "a.tif")
    im = read_image(tmp_path / "a.tif")
    assert im.meta["bit_depth"] == 16
    np.testing.assert_array_equal(im.data[0], a)
    f = np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)
    Image.fromarray(f).save(tmp_path / "f.tiff")
    im = read_image(tmp_path / "f.tiff")
    assert not im.meta["integer"]
    np.testing.assert_allclose(im.data[0], f)


def test_npy_layouts_and_no_pickle(tmp_path):
    a = np.random.default_rng(0).random((7, 8)).astype(np.float64)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_allclose(read_image(tmp_path / "a.npy").data[0], a, rtol=1e-6)
    hwc = np.random.default_rng(1).integers(0, 255, (7, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "hwc.npy", hwc)
    im = read_image(tmp_path / "hwc.npy")
    assert im.data.shape == (3, 7, 8) and im.meta["bit_depth"] == 8
    np.testing.assert_array_equal(im.data, np.moveaxis(hwc, -1, 0))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MedcfxError, match=r"cannot read .*obj\.npy: .*no pickle"):
        read_image(tmp_path / "obj.npy")
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(MedcfxError, match=r"bad\.npy: expected a 2D image"):
        read_image(tmp_path / "bad.npy")
    n = np.ones((3, 3), np.float32)
    n[1, 1] = np.nan
    np.save(tmp_path / "n.npy", n)
    with pytest.raises(MedcfxError, match=r"n\.npy: holds 1 NaN"):
        read_image(tmp_path / "n.npy")


def test_corrupt_png(tmp_path):
    f = write_png(tmp_path / "x.png", np.zeros((30, 30), np.uint8))
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(MedcfxError, match=r"cannot read .*x\.png: "):
        read_image(f)


def test_dicom_slope_intercept_monochrome2(tmp_path):
    stored = np.random.default_rng(0).integers(0, 4096, (6, 7)).astype(np.uint16)
    f = write_dicom(tmp_path / "ct.dcm", stored, slope=0.5, intercept=-1024)
    im = read_image(f)
    np.testing.assert_allclose(im.data[0], stored * 0.5 - 1024)
    assert im.meta["bit_depth"] == 12 and im.meta["mode"] == "MONOCHROME2"


def test_dicom_monochrome1_inverted_over_the_actual_range(tmp_path):
    stored = np.random.default_rng(1).integers(0, 4096, (6, 7)).astype(np.uint16)
    f = write_dicom(tmp_path / "cr.dcm", stored, photometric="MONOCHROME1", slope=2.0, intercept=10.0)
    im = read_image(f)
    # MONOCHROME1: brightness order reversed within the ACTUAL range of the values (not the nominal 12
    # bits), the darkest value at 0
    v = stored.astype(np.float64) * 2.0 + 10.0
    np.testing.assert_allclose(im.data[0], v.max() - v)
    # the brightest displayed pixel is the smallest stored value
    assert np.argmax(im.data[0]) == np.argmin(stored)


def test_dicom_rgb_and_suffixless(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    f = write_dicom(tmp_path / "IM0001", rgb, rgb=True)
    im = read_any(f)  # no suffix: recognised by the DICM marker
    assert im.data.shape == (3, 4, 5)
    np.testing.assert_array_equal(np.moveaxis(im.data, 0, -1), rgb)


def test_dicom_without_pydicom_names_the_extra(tmp_path, monkeypatch):
    f = write_dicom(tmp_path / "a.dcm", np.zeros((3, 3), np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(MedcfxError, match=r"reading DICOM needs the dicom extra: pip install 'medcfx\[dicom\]'"):
        read_image(f)


def test_read_any_dispatch_and_unknown_suffix(tmp_path):
    v = write_nii(tmp_path / "v.nii.gz", np.ones((3, 4, 5), np.float32))
    assert read_any(v).shape == (3, 4, 5)
    p = write_png(tmp_path / "p.png", np.zeros((3, 4), np.uint8))
    assert read_any(p).shape == (1, 3, 4)
    u = tmp_path / "x.xyz"
    u.write_text("hello")
    with pytest.raises(MedcfxError) as e:
        read_any(u)
    msg = str(e.value)
    assert "x.xyz" in msg and ".nii.gz" in msg and ".png" in msg and ".dcm" in msg and ".npy" in msg


def test_16bit_rgb_png_is_read_at_8_bits_with_a_note(tmp_path):
    import struct
    import zlib

    a = (np.arange(2 * 3 * 3).reshape(2, 3, 3) * 7000).astype(np.uint16)
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(2))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    f = tmp_path / "rgb16.png"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 16, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    im = read_image(f)
    assert im.meta["bit_depth"] == 8 and any("16-bit colour PNG" in n for n in im.meta["notes"])
    np.testing.assert_array_equal(np.moveaxis(im.data, 0, -1), a >> 8)
