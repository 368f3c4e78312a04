"""Small helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so importable as
``common``)."""

from __future__ import annotations

import os
from pathlib import Path


def case_count(data: Path) -> int:
    """Case folders of a demo brain set."""
    return sum(1 for p in Path(data).iterdir() if p.is_dir())


def grid_text(data: Path) -> str:
    """"X x Y x Z voxels of A x B x C mm" of the first case's first NIfTI file (nibabel's header), so a table
    states the grid its data has, not the one a script assumes."""
    import nibabel as nib

    img = nib.load(str(next(iter(sorted(Path(data).glob("*/*.nii.gz"))))))
    return (" x ".join(map(str, img.shape[:3])) + " voxels of "
            + " x ".join(f"{float(z):.3g}" for z in img.header.get_zooms()[:3]) + " mm")


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace the block between ``<!-- MARKER:start -->`` and ``<!-- MARKER:end -->`` of ``path`` with ``body``
    (appended when the markers are missing; the file is created with a "# Benchmarks" title), atomically;
    every other section is left as it was."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.{marker}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
