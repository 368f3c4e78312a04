"""medcfx.data.dicom: single-frame DICOM (modality LUT, VOI, MONOCHROME1, padding) and series folders as volumes.

Every input is a real DICOM file written here with pydicom; expectations are computed from the tags written,
independently of the reader (brute-force voxel positions, the DICOM LINEAR window formula, nibabel).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid  # noqa: E402

from medcfx.data.dicom import read_dicom_series  # noqa: E402
from medcfx.data.io import _reason, is_image_file, read_any, read_image, read_volume, write_nifti  # noqa: E402
from medcfx.data.layouts import detect_layout  # noqa: E402
from medcfx.errors import MedcfxError  # noqa: E402


def dcm(path: Path, stored: np.ndarray, *, photometric="MONOCHROME2", bits=12, signed=False, modality="OT",
        tags: dict | None = None) -> Path:
    """A single-frame greyscale DICOM (explicit VR little endian) with ``tags`` set on top."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    for k, v in (tags or {}).items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# single-frame files


def test_monochrome1_is_inverted_over_the_actual_range_not_bits_stored(tmp_path):
    s = np.random.default_rng(0).integers(0, 201, (6, 7)).astype(np.uint16)
    s[0, 0], s[0, 1] = 0, 200  # the content spans exactly 0..200; BitsStored 15 would say 0..32767
    m1 = read_image(dcm(tmp_path / "m1.dcm", s, photometric="MONOCHROME1", bits=15))
    m2 = read_image(dcm(tmp_path / "m2.dcm", 200 - s, photometric="MONOCHROME2", bits=15))
    np.testing.assert_array_equal(m1.data[0], 200.0 - s)
    np.testing.assert_array_equal(m1.data, m2.data)
    # the same MONOCHROME2 content (200 - s) written as the complement over the nominal 15 bits, as most
    # writers do: the same array (the darkest pixel is 0 in both)
    m1n = read_image(dcm(tmp_path / "m1n.dcm", 32767 - (200 - s), photometric="MONOCHROME1", bits=15))
    np.testing.assert_array_equal(m1n.data, m2.data)
    assert m1.meta["integer"] and m1.meta["bit_depth"] == 15 and m1.meta["voi_range"] is None
    assert m1.meta["padding"] is None and m1.meta["format"] == "dicom" and m1.meta["hu"] is False


@pytest.mark.parametrize("limit", [None, 4000])
def test_padding_pixels_are_marked_and_left_out_of_the_monochrome1_range(tmp_path, limit):
    s = np.random.default_rng(1).integers(100, 301, (8, 9)).astype(np.uint16)
    s[2, 3], s[4, 5] = 100, 300
    pad = np.zeros(s.shape, bool)
    pad[:, :2] = pad[-1, :] = True  # a padded border: 4095, or anything in 4000..4095 with a range limit
    s[pad] = 4095 if limit is None else np.random.default_rng(2).integers(4000, 4096, pad.sum())
    tags = {"PixelPaddingValue": 4095}
    if limit is not None:
        tags["PixelPaddingRangeLimit"] = limit
    im = read_image(dcm(tmp_path / "pad.dcm", s, photometric="MONOCHROME1", tags=tags))
    np.testing.assert_array_equal(im.meta["padding"], pad)
    # valid pixels: inverted within their own range 100..300, darkest at 0 (the padding 4000..4095 must not
    # widen the range)
    np.testing.assert_array_equal(im.data[0][~pad], 300.0 - s[~pad])
    assert im.data[0][~pad].min() == 0 and im.data[0][~pad].max() == 200


def _linear_window(x, c, w, ymin, ymax):
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR)."""
    x = np.asarray(x, np.float64)
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * (ymax - ymin) + ymin
    return np.where(x <= lo, ymin, np.where(x > hi, ymax, y))


def test_ct_in_hu_keeps_hu_and_ignores_the_files_window(tmp_path):
    """CT in HU is scaled by one fixed HU window later (medcfx.data.intensity), so the reader keeps HU even
    when the file carries a display window; a non-CT file's window is applied (next test)."""
    s = np.random.default_rng(3).integers(0, 4096, (6, 7)).astype(np.uint16)
    f = dcm(tmp_path / "ct.dcm", s, modality="CT", tags={"RescaleSlope": "1", "RescaleIntercept": "-1024",
                                                          "WindowCenter": "40", "WindowWidth": "400"})
    im = read_image(f)
    hu = s.astype(np.float64) - 1024
    np.testing.assert_array_equal(im.data[0], hu)
    assert im.meta["voi_range"] is None
    assert im.meta["hu"] is True and im.meta["modality"] == "CT" and im.meta["integer"] is False
    assert im.meta["rescale"] == [1.0, -1024.0] and any("window is not applied" in n for n in im.meta["notes"])
    # the same HU stored with another slope / intercept: the same values
    s2 = ((hu + 2048) / 2).astype(np.uint16)  # even HU only: exact
    hu_even = s2.astype(np.float64) * 2 - 2048
    im2 = read_image(dcm(tmp_path / "ct_b.dcm", s2, modality="CT", tags={"RescaleSlope": "2", "RescaleIntercept": "-2048"}))
    np.testing.assert_array_equal(im2.data[0], hu_even)
    # a windowed non-CT image: the LINEAR window of the standard (PS3.3 C.11.2.1.2) and its output range
    cr = read_image(dcm(tmp_path / "cr.dcm", s, modality="CR", tags={"WindowCenter": "2000", "WindowWidth": "1000"}))
    np.testing.assert_allclose(cr.data[0], _linear_window(s.astype(np.float64), 2000, 1000, 0.0, 4095.0), atol=1e-3)
    assert cr.meta["voi_range"] == (0.0, 4095.0) and any("VOI window" in n for n in cr.meta["notes"])
    # without the window the values are the HU themselves; a non-HU RescaleType is not HU
    im = read_image(dcm(tmp_path / "ct2.dcm", s, modality="CT", tags={"RescaleSlope": "1", "RescaleIntercept": "-1024"}))
    np.testing.assert_array_equal(im.data[0], hu)
    assert im.meta["hu"] is True and im.meta["voi_range"] is None and im.meta["integer"] is False
    im = read_image(dcm(tmp_path / "ct3.dcm", s, modality="CT", tags={"RescaleSlope": "2", "RescaleIntercept": "0", "RescaleType": "US"}))
    assert im.meta["hu"] is False and any("not Hounsfield" in n for n in im.meta["notes"])
    im = read_image(dcm(tmp_path / "mr.dcm", s, modality="MR"))
    assert im.meta["hu"] is False and im.meta["modality"] == "MR" and im.meta["integer"] is True


def test_monochrome1_with_window_is_inverted_over_the_voi_output(tmp_path):
    s = np.random.default_rng(4).integers(0, 1024, (5, 6)).astype(np.uint16)
    im = read_image(dcm(tmp_path / "cr.dcm", s, photometric="MONOCHROME1", bits=10,
                        tags={"WindowCenter": "500", "WindowWidth": "300"}))
    win = _linear_window(s, 500, 300, 0.0, 1023.0)
    np.testing.assert_allclose(im.data[0], 1023.0 - win, atol=1e-3)
    assert im.meta["voi_range"] == (0.0, 1023.0)


def test_voi_lut_sequence(tmp_path):
    s = np.random.default_rng(5).integers(0, 64, (4, 5)).astype(np.uint16)
    first, lut = 10, (np.arange(32) ** 2 + 7).astype(np.uint16)  # entries 7..968 for inputs 10..41
    item = Dataset()
    item.LUTDescriptor = [len(lut), first, 16]
    item.LUTData = lut.tolist()
    item["LUTDescriptor"].VR = "US"
    item["LUTData"].VR = "US"
    im = read_image(dcm(tmp_path / "lut.dcm", s, bits=6, tags={"VOILUTSequence": [item]}))
    expected = lut[np.clip(s.astype(int) - first, 0, len(lut) - 1)]
    np.testing.assert_array_equal(im.data[0], expected)
    assert im.meta["voi_range"] == (7.0, float(lut.max())) and im.meta["integer"] is False


def test_ybr_full_becomes_rgb(tmp_path):
    from pydicom.pixels import convert_color_space

    rgb = np.random.default_rng(6).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    f = dcm(tmp_path / "c.dcm", np.zeros((4, 5)))
    ds = pydicom.dcmread(f)
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "YBR_FULL"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = ybr.tobytes()
    ds.save_as(f)
    im = read_image(f)
    assert im.data.shape == (3, 4, 5) and im.meta["mode"] == "YBR_FULL"
    assert np.abs(np.moveaxis(im.data, 0, -1) - rgb).max() <= 2  # YCbCr round trip: rounding only, converted once


def test_palette_colour_goes_through_its_lookup_tables(tmp_path):
    idx = np.random.default_rng(7).integers(0, 4, (4, 5)).astype(np.uint8)
    luts = {"Red": [0, 65535, 1000, 30000], "Green": [5, 6, 7, 8], "Blue": [65535, 0, 20000, 40000]}
    f = dcm(tmp_path / "pal.dcm", np.zeros((4, 5)))
    ds = pydicom.dcmread(f)
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "PALETTE COLOR", 8, 8, 7
    ds.PixelData = idx.tobytes()
    for colour, lut in luts.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.asarray(lut, "<u2").tobytes())
    ds.save_as(f)
    im = read_image(f)
    expected = np.stack([np.asarray(luts[c])[idx] for c in ("Red", "Green", "Blue")])
    np.testing.assert_array_equal(im.data, expected)
    assert im.meta["bit_depth"] == 16 and any("palette" in n for n in im.meta["notes"])


def test_extensionless_and_ima_files_are_images_by_the_dicm_marker(tmp_path):
    s = np.arange(12, dtype=np.uint16).reshape(3, 4)
    d = tmp_path / "series"
    for name in ("IM0001", "IM0002.IMA", "1.3.12.2.1107.5"):
        dcm(d / name, s)
    (d / "README").write_text("not an image")
    (d / "DICOMDIR").write_bytes((d / "IM0001").read_bytes())  # an index file: DICM marker, but no image
    assert [is_image_file(d / n) for n in ("IM0001", "IM0002.IMA", "1.3.12.2.1107.5", "README", "DICOMDIR")] == [
        True, True, True, False, False]
    for name in ("IM0001", "IM0002.IMA", "1.3.12.2.1107.5"):
        np.testing.assert_array_equal(read_any(d / name).data[0], s)
    lay = detect_layout(d)
    assert lay.kind == "folder" and sorted(c.id for c in lay.cases) == ["1.3.12.2.1107.5", "IM0001", "IM0002.IMA"]
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\0" * 300)
    with pytest.raises(MedcfxError, match=r"cannot read .*fake\.dcm: not a DICOM file \(no 'DICM' marker at byte 128\)"):
        read_image(fake)


def test_undecodable_compressed_file_carries_pydicoms_whole_reason(tmp_path):
    from pydicom.encaps import encapsulate

    f = dcm(tmp_path / "jls.dcm", np.zeros((4, 5)))
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 40])
    ds["PixelData"].VR = "OB"
    ds.save_as(f)
    try:
        pydicom.dcmread(f).pixel_array
    except Exception as exc:  # pydicom's own reason, independently
        theirs = " ".join(str(exc).split())
    with pytest.raises(MedcfxError) as e:
        read_image(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot read {f}: pixel data not decodable (transfer syntax JPEG-LS")
    assert theirs in msg  # every line of it (e.g. each missing decoder package), not cut at a newline or colon


def test_reason_keeps_the_whole_message_on_one_line():
    assert _reason(ValueError("first: part\n\tsecond - line\n  third")) == "ValueError: first: part second - line third"
    long = _reason(RuntimeError("x" * 1000))
    assert long.startswith("RuntimeError: xxx") and long.endswith("...") and len(long) < 430


# ---------------------------------------------------------------------------------------------------------
# series folders


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


def write_series(d: Path, iop, n=5, rows=6, cols=7, spacing=(0.8, 0.6), step=2.5, origin=(-30.0, 12.0, 40.0), seed=0,
                 uid=None, order=None, modality="CT") -> list[np.ndarray]:
    """Slices k = 0..n-1 at origin + k * step * normal, written in shuffled order with extension-less names."""
    rng = np.random.default_rng(seed)
    iop = [float(f"{v:.9f}") for v in iop]
    normal = np.cross(iop[:3], iop[3:])
    uid = uid or generate_uid()
    order = rng.permutation(n) if order is None else order
    stored = [rng.integers(0, 4096, (rows, cols)).astype(np.uint16) for _ in range(n)]
    for name_i, k in enumerate(order):
        ipp = np.asarray(origin) + k * step * normal
        dcm(d / f"IM{name_i:04d}", stored[k], modality=modality, tags={
            "SeriesInstanceUID": uid, "ImageOrientationPatient": [f"{v:.9f}" for v in iop],
            "ImagePositionPatient": [f"{v:.6f}" for v in ipp], "PixelSpacing": [str(spacing[0]), str(spacing[1])],
            "SliceThickness": str(step), "RescaleSlope": "1", "RescaleIntercept": str(-1024 + k)})
    return stored


def _brute_force_check(vol, d: Path) -> None:
    """Every pixel of every file, placed in RAS world from its own tags, lands on the voxel holding its value."""
    inv = np.linalg.inv(vol.affine)
    ks = set()
    for f in sorted(d.iterdir()):
        ds = pydicom.dcmread(f)
        row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        ipp, (dr, dc) = np.array(ds.ImagePositionPatient, float), [float(v) for v in ds.PixelSpacing]
        value = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        lps = ipp + c[..., None] * dc * row + r[..., None] * dr * col  # [rows, cols, 3]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        vox = ras @ inv[:3, :3].T + inv[:3, 3]
        np.testing.assert_allclose(vox[..., 0], c, atol=1e-3)  # i = column index
        np.testing.assert_allclose(vox[..., 1], r, atol=1e-3)  # j = row index
        k = vox[..., 2]
        assert np.ptp(k) < 1e-3 and abs(k.mean() - round(k.mean())) < 1e-3
        k = int(round(k.mean()))
        ks.add(k)
        np.testing.assert_array_equal(vol.data[:, :, k], value.T.astype(np.float32))
    assert ks == set(range(vol.shape[2]))


def test_axial_series_data_affine_and_nibabel_orientation(tmp_path):
    d = tmp_path / "axial"
    write_series(d, [1, 0, 0, 0, 1, 0])
    vol = read_volume(d)
    assert vol.shape == (7, 6, 5) and vol.header is None and vol.data.dtype == np.float32
    _brute_force_check(vol, d)
    assert vol.meta["zooms"] == pytest.approx((0.6, 0.8, 2.5)) and vol.meta["hu"] is True and vol.meta["dtype"] == "uint16"
    # DICOM LPS-axial rows/columns with slices going up: nibabel calls that L, P, S
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    out = write_nifti(tmp_path / "axial.nii.gz", vol.data, like=vol)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(vol.affine)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 1
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), vol.data)
    assert back.header.get_zooms() == pytest.approx((0.6, 0.8, 2.5))
    # like= the series folder itself: the same grid
    again = nib.load(str(write_nifti(tmp_path / "again.nii", vol.data, like=d)))
    np.testing.assert_allclose(again.affine, vol.affine, atol=1e-5)


def test_oblique_series_matches_brute_force_and_nibabels_dicom_affine(tmp_path):
    R = _rotation(0.4, 0.7)
    d = tmp_path / "oblique"
    write_series(d, list(R[:, 0]) + list(R[:, 1]), n=4, seed=3)
    vol = read_dicom_series(d)
    _brute_force_check(vol, d)
    assert nib.aff2axcodes(vol.affine) == nib.aff2axcodes(nib.load(str(write_nifti(tmp_path / "o.nii", vol.data, like=vol))).affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the DICOM readers are highly experimental"
        from nibabel.nicom import dicomwrappers

    first = vol.meta["files"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dicomwrappers.wrapper_from_file(str(first)).affine  # (row, column, slice) -> LPS, SliceThickness step
    ours_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    np.testing.assert_allclose(ours_lps[:, [1, 0, 3]], theirs[:, [0, 1, 3]], atol=1e-4)
    # nibabel's single-slice third axis is the right-handed cross(column, row) times SliceThickness; ours
    # is the series' own step, along cross(row, column) here since the slices were written going that way
    np.testing.assert_allclose(ours_lps[:3, 2], -theirs[:3, 2], atol=1e-4)


def test_series_errors_name_the_problem(tmp_path):
    two = tmp_path / "two"
    write_series(two, [1, 0, 0, 0, 1, 0], n=2, uid="1.2.3.1")
    write_series(two / "x", [1, 0, 0, 0, 1, 0], n=2, uid="1.2.3.2")
    for f in (two / "x").iterdir():
        f.rename(two / f"B{f.name}")
    with pytest.raises(MedcfxError, match=r"two: holds 2 DICOM series: 1\.2\.3\.1 \(2 file.*; 1\.2\.3\.2 \(2 file"):
        read_volume(two)
    dup = tmp_path / "dup"
    write_series(dup, [1, 0, 0, 0, 1, 0], n=3, order=[0, 1, 1])
    with pytest.raises(MedcfxError, match=r"IM0001 and IM0002 are at the same position 42\.500 mm along the slice normal \(duplicate slice\)"):
        read_volume(dup)
    gap = tmp_path / "gap"
    write_series(gap, [1, 0, 0, 0, 1, 0], n=5, order=[0, 1, 2, 4])
    with pytest.raises(MedcfxError, match=r"not evenly spaced: 5\.000 mm between IM0002 and IM0003, 2\.500 mm elsewhere \(missing slice\?\)"):
        read_volume(gap)
    nopos = tmp_path / "nopos"
    write_series(nopos, [1, 0, 0, 0, 1, 0], n=2)
    ds = pydicom.dcmread(nopos / "IM0001")
    del ds.ImagePositionPatient
    ds.save_as(nopos / "IM0001")
    with pytest.raises(MedcfxError, match=r"IM0001: DICOM slice has no ImagePositionPatient"):
        read_volume(nopos)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(MedcfxError, match="holds no DICOM files"):
        read_any(empty)
