"""explain outputs of a BIDS input as a BIDS derivative dataset (issue 17).

The case folders in ``--out`` stay the outputs every method writes (``out/sub-01_ses-2/heatmap.nii.gz``
...); for a BIDS input, :func:`write_derivative` also lays them out as the derivative dataset
``out/derivatives/medcfx/`` (BIDS 1.9 derivatives):

    derivatives/medcfx/dataset_description.json          DatasetType "derivative", GeneratedBy medcfx
    derivatives/medcfx/sub-01/[ses-2/]anat/sub-01[_ses-2]_desc-heatmap.nii.gz
                                           ..._desc-lesion_mask.nii.gz               (calibrated models)
                                           ..._desc-counterfactual_T1w.nii.gz      (t1; t2 -> T2w,
                                           flair -> FLAIR, t1ce -> ce-gadolinium ... T1w)

The files are hard links to the case folders' files (copies where the file system has no links), so the
view costs no space; it is rebuilt from every case folder present by each run (atomically: the whole
``derivatives/medcfx`` folder is staged and swapped), like summary.csv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import medcfx
from medcfx import staging

__all__ = ["write_derivative"]

_CASE = re.compile(r"(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?")
_CHANNEL = {"t1": "desc-counterfactual_T1w", "t1ce": "ce-gadolinium_desc-counterfactual_T1w",
            "t2": "desc-counterfactual_T2w", "flair": "desc-counterfactual_FLAIR"}


def _bids_name(file: str) -> str | None:
    """The derivative entity/suffix part of a case-folder file name, None for files without one."""
    if file == "heatmap.nii.gz":
        return "desc-heatmap"
    if file == "mask.nii.gz":
        return "desc-lesion_mask"
    m = re.fullmatch(r"counterfactual_(.+)\.nii\.gz", file)
    return _CHANNEL.get(m.group(1)) if m else None


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def write_derivative(out: Path, sources: list[Path]) -> Path | None:
    """Lay out the case folders of ``out`` whose names are BIDS subject/session ids as
    ``out/derivatives/medcfx`` (see the module docstring); ``sources``: the BIDS inputs (recorded in
    dataset_description.json). Returns the derivative folder, or None when no case folder has a BIDS id."""
    cases = [f for f in sorted(Path(out).iterdir()) if f.is_dir() and _CASE.fullmatch(f.name)]
    if not cases:
        return None
    final = Path(out) / "derivatives" / "medcfx"
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.sweep(final.parent)
    with staging.staged_folder(final) as tmp:
        description = {"Name": "medcfx explain outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                       "GeneratedBy": [{"Name": "medcfx", "Version": medcfx.__version__}],
                       "SourceDatasets": [{"URL": Path(s).absolute().as_uri()} for s in sources]}
        (tmp / "dataset_description.json").write_text(json.dumps(description, indent=1) + "\n")
        for case in cases:
            sub, ses = _CASE.fullmatch(case.name).groups()
            anat = tmp / sub / (ses or "") / "anat"
            prefix = case.name  # sub-01 or sub-01_ses-2: the BIDS file-name prefix
            for f in sorted(case.iterdir()):
                name = _bids_name(f.name)
                if name is not None:
                    anat.mkdir(parents=True, exist_ok=True)
                    _link(f, anat / f"{prefix}_{name}.nii.gz")
    return final
