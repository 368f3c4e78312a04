"""Data layer: read files, recognise dataset layouts, preprocess into a cached SliceSet, check datasets.

    from medcfx.data import prepare, PreprocessConfig
    ss = prepare("BraTS2021/", PreprocessConfig(size=64))   # cached; second call reads no input file
    ss.images[i]          # float32 [C, S, S] in [-1, 1]
    ss.labels[:, 0]       # 1 unhealthy / 0 healthy / NaN unknown
    ss.write_case(case_id, heatmap_slices, "out.nii.gz")    # back on the input grid, input affine

Modules: :mod:`~medcfx.data.io` (readers/writers), :mod:`~medcfx.data.layouts` (BraTS, image folders,
labels.csv, nnU-Net, npz), :mod:`~medcfx.data.preprocess` (normalisation, geometry, SliceSet),
:mod:`~medcfx.data.cache` (content-keyed atomic cache), :mod:`~medcfx.data.check` (report every problem),
:mod:`~medcfx.data.cli` (``medcfx data``), :mod:`~medcfx.data.demo` (synthetic demo datasets).
"""

from medcfx.data.cache import cache_root
from medcfx.data.check import Report  # the function: medcfx.data.check.check (the name is the module's)
from medcfx.data.io import Image2D, Volume, read_any, read_image, read_volume, write_nifti
from medcfx.data.layouts import LAYOUT_KINDS, Case, Layout, detect_layout, load_layout
from medcfx.data.preprocess import (
    PREPROCESS_VERSION,
    PreprocessConfig,
    SliceGeometry,
    SliceSet,
    prepare,
    resize_matrix,
)

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
    "read_image",
    "read_volume",
    "resize_matrix",
    "write_nifti",
]
