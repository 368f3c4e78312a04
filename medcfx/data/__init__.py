"""Data layer: read files, recognise dataset layouts, preprocess into a cached SliceSet, check datasets.

    from medcfx.data import prepare, PreprocessConfig
    ss = prepare("BraTS2021/", PreprocessConfig(size=64))   # cached; second call reads no input file
    ss.images[i]          # float32 [C, S, S] in [-1, 1]
    ss.labels[:, 0]       # 1 unhealthy / 0 healthy / NaN unknown
    ss.write_case(case_id, heatmap_slices, "out.nii.gz")    # back on the input grid, input affine

Modules: :mod:`~medcfx.data.io` (readers/writers), :mod:`~medcfx.data.layouts` (BraTS, image folders,
labels.csv, nnU-Net, Decathlon, npz), :mod:`~medcfx.data.dicom` (DICOM files and series),
:mod:`~medcfx.data.geometry` (orientation, grids, model slices),
:mod:`~medcfx.data.intensity` (foreground, scaling rules), :mod:`~medcfx.data.preprocess` (the steps per case,
``prepare``), :mod:`~medcfx.data.sliceset` (the cached SliceSet),
:mod:`~medcfx.data.cache` (content-keyed atomic cache), :mod:`~medcfx.data.check` (report every problem),
:mod:`~medcfx.data.cli` (``medcfx data``; its ``demo`` command writes :mod:`medcfx.demo`'s
synthetic datasets).
"""

from medcfx.data.cache import cache_root
from medcfx.data.check import Report  # the function: medcfx.data.check.check (the name is the module's)
from medcfx.data.dicom import read_dicom_image, read_dicom_series
from medcfx.data.io import Image2D, Volume, read_any, read_image, read_volume, write_nifti
from medcfx.data.layouts import LAYOUT_KINDS, Case, Layout, detect_layout, load_layout
from medcfx.data.geometry import SliceGeometry, resize_matrix
from medcfx.data.preprocess import PREPROCESS_VERSION, PreprocessConfig, prepare
from medcfx.data.sliceset import SliceSet

__all__ = [
    "Case",
    "Image2D",
    "LAYOUT_KINDS",
    "Layout",
    "PREPROCESS_VERSION",
    "PreprocessConfig",
    "Report",
    "SliceGeometry",
    "SliceSet",
    "Volume",
    "cache_root",
    "detect_layout",
    "load_layout",
    "prepare",
    "read_any",
    "read_dicom_image",
    "read_dicom_series",
    "read_image",
    "read_volume",
    "resize_matrix",
    "write_nifti",
]
