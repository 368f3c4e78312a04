"""Helpers shared by the tests/test_data_*.py files (no tests here): tiny real datasets on disk."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

MODS = ("t1", "t1ce", "t2", "flair")
SHAPE = (24, 20, 12)  # X, Y, Z: tiny, non-square in-plane on purpose


def affine_for(seed: int = 0) -> np.ndarray:
    a = np.diag([1.2, 0.9, 2.0, 1.0])
    a[:3, 3] = [-10.0 - seed, 5.0, 2.5]
    return a


def brain_mask(shape=SHAPE) -> np.ndarray:
    X, Y, Z = shape
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    return ((x - X / 2 + 0.5) / (X * 0.42)) ** 2 + ((y - Y / 2 + 0.5) / (Y * 0.42)) ** 2 + ((z - Z / 2 + 0.5) / (Z * 0.45)) ** 2 < 1


def write_nii(path: Path, data: np.ndarray, affine=None, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data) if dtype is None else np.asarray(data).astype(dtype)
    nib.save(nib.Nifti1Image(arr, affine_for() if affine is None else affine), str(path))
    return path


def write_brats_case(root: Path, case: str, seed: int = 0, shape=SHAPE, names=None, seg: np.ndarray | None | bool = True,
                     lesion=((10, 13), (8, 11), (5, 7)), suffix=".nii.gz", sep="_") -> dict[str, np.ndarray]:
    """Write one BraTS case folder; return the arrays written (modality -> data, 'seg' -> seg)."""
    rng = np.random.default_rng(seed)
    d = root / case
    d.mkdir(parents=True, exist_ok=True)
    brain = brain_mask(shape)
    names = names or {m: m for m in MODS}
    out = {}
    for m in MODS:
        v = (rng.gamma(4.0, 50.0, size=shape) + 10.0) * brain
        write_nii(d / f"{case}{sep}{names[m]}{suffix}", v.astype(np.float32), affine_for(seed))
        out[m] = v.astype(np.float32)
    if seg is True:
        s = np.zeros(shape, np.uint8)
        (x0, x1), (y0, y1), (z0, z1) = lesion
        s[x0:x1, y0:y1, z0:z1] = 2
        seg = s
    if seg is not None and seg is not False:
        write_nii(d / f"{case}{sep}{names.get('seg', 'seg')}{suffix}", np.asarray(seg).astype(np.uint8), affine_for(seed))
        out["seg"] = np.asarray(seg)
    return out


def write_brats(root: Path, n: int = 3, **kw) -> Path:
    for i in range(n):
        write_brats_case(root, f"BraTS_{i:03d}", seed=i, **kw)
    return root


def truncate_gzip(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: max(20, int(len(raw) * keep))])


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def write_dicom(path: Path, stored: np.ndarray, photometric="MONOCHROME2", slope=None, intercept=None, bits_stored=12,
                signed=False, rgb=False) -> Path:
    """A minimal valid single-frame DICOM (explicit VR little endian, uncompressed) written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = stored.shape[:2]
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = "RGB"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(stored.astype(np.uint8)).tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    if slope is not None:
        ds.RescaleSlope = str(slope)
    if intercept is not None:
        ds.RescaleIntercept = str(intercept)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def area_resize_ref(img: np.ndarray, n_out: int) -> np.ndarray:
    """Independent exact area resize of the last two axes (square input) by supersampling to the lcm grid."""
    n_in = img.shape[-1]
    L = np.lcm(n_in, n_out)
    up = np.repeat(np.repeat(img, L // n_in, axis=-1), L // n_in, axis=-2)
    k = L // n_out
    sh = up.shape[:-2] + (n_out, k, n_out, k)
    return up.reshape(sh).mean(axis=(-1, -3))


def pad_square_ref(img: np.ndarray) -> np.ndarray:
    """Centred zero padding of the last two axes to a square (extra odd pixel after)."""
    a, b = img.shape[-2:]
    s = max(a, b)
    pa, pb = s - a, s - b
    widths = [(0, 0)] * (img.ndim - 2) + [(pa // 2, pa - pa // 2), (pb // 2, pb - pb // 2)]
    return np.pad(img, widths)


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)
