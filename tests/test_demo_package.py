"""The demo generators' own package (medcfx.demo): ``medcfx data demo`` writes what it wrote before the move.

Reference: the images and labels.csv written by the generators at their old path (medcfx.data.demo*,
commit a5b4ecc) with the options below. The images are compared by integer summaries (sum, sum of
squares, sums weighted by row and by column index), with room for a few pixels that round the other way
on another CPU or numpy build; labels.csv (geometry-derived labels, boxes, CTR) must match exactly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medcfx.data.cli import data_app
from medcfx.demo import make_demo

runner = CliRunner()

OLD = {
    "chest": (
        ["--cases", "3", "--opt", "prevalence=[1,1,1]"],  # every finding, so the nodule placement (erosion) runs
        {
            "cxr_00000.png": (1712161, 238819359, 122269855, 107573255),
            "cxr_00001.png": (1815943, 267542509, 126510945, 119306134),
            "cxr_00002.png": (2025715, 308987261, 141644531, 132163987),
        },
        "file,cardiomegaly,effusion,nodule,bbox_cardiomegaly,bbox_effusion,bbox_nodule,meta_ctr\n"
        "images/cxr_00000.png,1,1,1,50;63;102;89,21;78;32;88,48;59;51;62,0.6265\n"
        "images/cxr_00001.png,1,1,1,50;60;101;87,21;66;109;93,31;54;36;59,0.5795\n"
        "images/cxr_00002.png,1,1,1,46;60;101;86,99;68;108;89,34;47;39;52,0.6322\n",
    ),
    "vertebra": (
        ["--cases", "2"],
        {
            "vert_00000.png": (10562438, 12304085022, 499240952, 510326697),
            "vert_00001.png": (10644030, 12560536226, 506281061, 513589707),
        },
        "file,fracture,grade\nimages/vert_00000.png,1,1\nimages/vert_00001.png,0,0\n",
    ),
}


def _summary(a: np.ndarray) -> tuple[int, int, int, int]:
    a = a.astype(np.int64)
    r, c = np.indices(a.shape)
    return int(a.sum()), int((a * a).sum()), int((a * r).sum()), int((a * c).sum())


@pytest.mark.parametrize("kind", sorted(OLD))
def test_data_demo_writes_what_the_generators_wrote_before_the_move(kind, tmp_path):
    args, images, labels = OLD[kind]
    out = tmp_path / kind
    res = runner.invoke(data_app, ["demo", kind, "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    assert (out / "labels.csv").read_text() == labels
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(images)
    for name, want in images.items():
        a = np.asarray(Image.open(out / "images" / name))
        got = _summary(a)
        top = 255 if a.dtype == np.uint8 else 4095  # vertebra: 16-bit PNG of HU + 1024 clipped to 0..4095
        h, w = a.shape
        slack = 4 * np.array([1, 2 * top + 1, h, w])  # four pixels off by one grey level
        assert np.all(np.abs(np.array(got) - np.array(want)) <= slack), (name, got, want)


def test_brain_from_the_cli_equals_make_demo(tmp_path):
    res = runner.invoke(data_app, ["demo", "brain", "--out", str(tmp_path / "cli"), "--cases", "1",
                                   "--opt", "shape=[48,48,31]", "--opt", "anatomy=procedural"])
    assert res.exit_code == 0, res.output
    make_demo("brain", tmp_path / "api", cases=1, seed=0, shape=(48, 48, 31), anatomy="procedural")
    files = sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*.nii.gz"))
    assert [f.name for f in files] == [f"demo_00000_{m}.nii.gz" for m in ("flair", "seg", "t1", "t1ce", "t2")]
    for f in files:
        a, b = nib.load(str(tmp_path / "cli" / f)), nib.load(str(tmp_path / "api" / f))
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)) and np.array_equal(a.affine, b.affine)


def test_the_data_package_holds_no_demo_generators():
    for old in ("demo", "demo_brain", "demo_vertebra", "demo_chest"):
        assert importlib.util.find_spec(f"medcfx.data.{old}") is None
    import medcfx.demo

    assert not any(p.name.startswith("demo") for p in Path(medcfx.demo.__file__).parent.parent.joinpath("data").iterdir())
