"""medcfx.data.layouts: BraTS (2021 and 2023 names), image folders, labels.csv, nnU-Net raw, MedMNIST npz."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_data_helpers import MODS, write_brats, write_brats_case, write_nii, write_png

from medcfx.data.layouts import detect_layout, load_layout, resolve_modalities
from medcfx.errors import MedcfxError, UsageError

NAMES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}


def test_brats_2021_names(tmp_path):
    root = write_brats(tmp_path / "brats", n=3)
    lay = detect_layout(root)
    assert lay.kind == "brats" and lay.dims == 3
    assert lay.channels == list(MODS) and lay.label_names == ["unhealthy"]
    assert [c.id for c in lay.cases] == ["BraTS_000", "BraTS_001", "BraTS_002"]
    c = lay.cases[1]
    assert [p.name for p in c.channels] == [f"BraTS_001_{m}.nii.gz" for m in MODS]
    assert c.mask.name == "BraTS_001_seg.nii.gz" and lay.problems == []
    assert len(lay.files()) == 15


def test_brats_2023_names_map_to_canonical_and_order_is_configurable(tmp_path):
    root = tmp_path / "b23"
    for i in range(2):
        write_brats_case(root, f"BraTS-GLI-{i:05d}-000", seed=i, names=NAMES_2023, sep="-")
    lay = detect_layout(root, modalities=("flair", "t1"))
    assert lay.channels == ["flair", "t1"]
    assert [p.name for p in lay.cases[0].channels] == ["BraTS-GLI-00000-000-t2f.nii.gz", "BraTS-GLI-00000-000-t1n.nii.gz"]
    assert lay.cases[0].mask.name == "BraTS-GLI-00000-000-seg.nii.gz"
    lay = detect_layout(root, modalities="t1c,t2w")  # aliases accepted
    assert lay.channels == ["t1ce", "t2"]


def test_brats_single_case_folder_and_nii_suffix(tmp_path):
    write_brats_case(tmp_path, "Case7", suffix=".nii")
    lay = detect_layout(tmp_path / "Case7")
    assert lay.kind == "brats" and [c.id for c in lay.cases] == ["Case7"]
    assert lay.cases[0].channels[0].name == "Case7_t1.nii"


def test_brats_collects_every_problem(tmp_path):
    root = write_brats(tmp_path / "b", n=4)
    (root / "BraTS_001" / "BraTS_001_t1ce.nii.gz").unlink()
    (root / "BraTS_003" / "BraTS_003_flair.nii.gz").unlink()
    (root / "BraTS_003" / "BraTS_003_t2.nii.gz").unlink()
    (root / "BraTS_002" / "BraTS_002_seg.nii.gz").unlink()  # no seg: info, not a problem
    lay = detect_layout(root)
    assert len(lay.problems) == 3
    assert any("BraTS_001" in p and "t1ce" in p for p in lay.problems)
    assert any("BraTS_003" in p and "flair" in p for p in lay.problems)
    assert any("BraTS_003" in p and "t2" in p for p in lay.problems)
    assert [c.id for c in lay.cases] == ["BraTS_000", "BraTS_002"]
    assert lay.cases[1].mask is None and any("BraTS_002" in i for i in lay.info)


def test_unknown_modality_is_usage_error():
    with pytest.raises(UsageError, match="unknown modality 'pd'"):
        resolve_modalities(["t1", "pd"])
    with pytest.raises(UsageError, match="twice"):
        resolve_modalities(["t1", "t1n"])


def test_empty_folder_and_unknown_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedcfxError, match="empty.*folder is empty"):
        detect_layout(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "readme.txt").write_text("x")
    with pytest.raises(MedcfxError, match="no known dataset layout"):
        detect_layout(tmp_path / "odd")
    with pytest.raises(MedcfxError, match="no such file"):
        detect_layout(tmp_path / "missing")
    with pytest.raises(UsageError, match="unknown layout kind"):
        load_layout(tmp_path / "odd", "dicomdir")


# ---------------------------------------------------------------------------------------------------------
# image folders


def _img(rng, shape=(12, 10)):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_image_folder_with_masks(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(tmp_path / "normal" / f"n{i}.png", _img(rng))
    for i in range(2):
        write_png(tmp_path / "abnormal" / f"a{i}.png", _img(rng))
    write_png(tmp_path / "masks" / "a0.png", (rng.random((12, 10)) > 0.5).astype(np.uint8) * 255)
    write_png(tmp_path / "masks" / "stray.png", np.zeros((12, 10), np.uint8))
    lay = detect_layout(tmp_path)
    assert lay.kind == "folder" and lay.dims == 2 and lay.label_names == ["abnormal"]
    by = {c.id: c for c in lay.cases}
    assert by["normal/n0.png"].labels == {"abnormal": 0.0} and by["normal/n0.png"].has_mask  # known lesion-free
    assert by["abnormal/a0.png"].labels == {"abnormal": 1.0} and by["abnormal/a0.png"].mask.name == "a0.png"
    assert by["abnormal/a1.png"].mask is None and not by["abnormal/a1.png"].has_mask
    assert any("a1.png" in i for i in lay.info)
    assert len(lay.problems) == 1 and "stray.png" in lay.problems[0]


def test_image_folder_mask_matched_by_stem(tmp_path):
    rng = np.random.default_rng(1)
    write_png(tmp_path / "abnormal" / "x.jpg", np.repeat(_img(rng)[..., None], 3, -1))
    write_png(tmp_path / "masks" / "x.png", np.ones((12, 10), np.uint8))
    lay = detect_layout(tmp_path)
    assert lay.cases[0].mask.name == "x.png" and lay.problems == []


# ---------------------------------------------------------------------------------------------------------
# labels.csv


def test_labels_csv_full(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        write_png(tmp_path / "img" / f"{i}.png", _img(rng))
    (tmp_path / "labels.csv").write_text(
        "file,effusion,nodule,grade,split,bbox_nodule,meta_ctr\n"
        "img/0.png,1,0,2,train,1;2;5;7,0.44\n"
        "img/1.png,0,,,val,,0.61\n"
        "img/2.png,,1,0,test,0;0;3.5;4,\n"
        "img/3.png,1.0,0.0,3.0,,,x\n"
    )
    lay = detect_layout(tmp_path)
    assert lay.kind == "csv" and lay.problems == []
    assert lay.label_names == ["effusion", "nodule"]  # meta_* columns are information, not labels
    c0, c1, c2, c3 = lay.cases
    assert c0.labels == {"effusion": 1.0, "nodule": 0.0} and c0.grade == 2 and c0.split == "train"
    assert c0.bbox == {"nodule": (1.0, 2.0, 5.0, 7.0)}
    assert math.isnan(c1.labels["nodule"]) and math.isnan(c1.grade) and c1.bbox == {}
    assert math.isnan(c2.labels["effusion"]) and c2.bbox["nodule"] == (0.0, 0.0, 3.5, 4.0)
    assert c3.grade == 3 and c3.split is None
    assert (tmp_path / "labels.csv") in lay.files()
    # the csv path itself works too
    assert len(detect_layout(tmp_path / "labels.csv").cases) == 4


def test_labels_csv_collects_every_problem(tmp_path):
    rng = np.random.default_rng(0)
    write_png(tmp_path / "a.png", _img(rng))
    write_png(tmp_path / "b.png", _img(rng))
    (tmp_path / "labels.csv").write_text(
        "file,sick,grade,split,bbox_sick,bbox_other\n"
        "a.png,1,2,train,1;2;3;4,\n"
        "missing1.png,0,,,,\n"
        "b.png,2,x,holdout,1;2;3,\n"
        "missing2.png,1,,,,\n"
        "a.png,1,,,,\n"
    )
    lay = detect_layout(tmp_path)
    probs = "\n".join(lay.problems)
    assert "bbox_other" in probs  # names no label column
    assert "missing1.png not found" in probs and "missing2.png not found" in probs
    assert "column sick must be 0, 1 or empty, got '2'" in probs
    assert "grade must be an integer" in probs and "split must be one of" in probs
    assert "bbox_sick must be 'x0;y0;x1;y1'" in probs
    assert "already listed on line 2" in probs
    assert len(lay.problems) == 8
    assert [c.id for c in lay.cases] == ["a.png"]


def test_labels_csv_structure_errors(tmp_path):
    (tmp_path / "labels.csv").write_text("path,x\na.png,1\n")
    with pytest.raises(MedcfxError, match="first column must be 'file'"):
        detect_layout(tmp_path)
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(MedcfxError, match="labels.csv: file is empty"):
        detect_layout(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# nnU-Net


def _nnunet(root, channel_names, cases=2, ending=".nii.gz", labels=True, v1=False):
    root.mkdir(parents=True)
    meta = {"labels": {"background": 0, "tumour": 1}, "numTraining": cases, "file_ending": ending}
    meta["modality" if v1 else "channel_names"] = {str(i): n for i, n in enumerate(channel_names)}
    (root / "dataset.json").write_text(json.dumps(meta))
    for c in range(cases):
        for i in range(len(channel_names)):
            if ending == ".png":
                write_png(root / "imagesTr" / f"case_{c:03d}_{i:04d}.png", np.full((8, 9), 10 * (i + 1), np.uint8))
            else:
                write_nii(root / "imagesTr" / f"case_{c:03d}_{i:04d}{ending}", np.full((6, 5, 4), i + 1, np.float32))
        if labels:
            if ending == ".png":
                write_png(root / "labelsTr" / f"case_{c:03d}.png", np.zeros((8, 9), np.uint8))
            else:
                write_nii(root / "labelsTr" / f"case_{c:03d}{ending}", np.zeros((6, 5, 4), np.uint8))
    return root


def test_nnunet_mri_channels_selected_by_modality(tmp_path):
    root = _nnunet(tmp_path / "Dataset001_BrainTumour", ["FLAIR", "T1w", "t1gd", "T2w"])
    lay = detect_layout(root)
    assert lay.kind == "nnunet" and lay.channels == list(MODS) and lay.problems == []
    assert [p.name for p in lay.cases[0].channels] == [f"case_000_{i:04d}.nii.gz" for i in (1, 2, 3, 0)]
    assert lay.cases[0].mask.name == "case_000.nii.gz"


def test_nnunet_non_mri_uses_all_channels_v1_and_missing_channel(tmp_path):
    root = _nnunet(tmp_path / "Task02", ["CT"], v1=True)
    (root / "imagesTr" / "case_001_0000.nii.gz").unlink()
    write_nii(root / "imagesTr" / "case_005_0001.nii.gz", np.ones((6, 5, 4), np.float32))
    lay = detect_layout(root)
    assert lay.channels == ["CT"] and [c.id for c in lay.cases] == ["case_000"]
    probs = "\n".join(lay.problems)
    assert "case_005 is missing channel file(s) case_005_0000.nii.gz" in probs
    assert "case_001" in probs  # label without images


def test_nnunet_2d_png(tmp_path):
    root = _nnunet(tmp_path / "D2", ["R", "G"], ending=".png")
    lay = detect_layout(root)
    assert lay.dims == 2 and lay.channels == ["R", "G"] and len(lay.cases) == 2 and lay.cases[0].mask is not None


# ---------------------------------------------------------------------------------------------------------
# npz


def test_npz_binary_multilabel_multiclass(tmp_path):
    rng = np.random.default_rng(0)
    np.savez_compressed(tmp_path / "bin.npz", train_images=rng.integers(0, 255, (5, 8, 8), dtype=np.uint8),
                        train_labels=np.array([[0], [1], [1], [0], [1]]),
                        test_images=rng.integers(0, 255, (2, 8, 8), dtype=np.uint8), test_labels=np.array([[1], [0]]))
    lay = detect_layout(tmp_path / "bin.npz")
    assert lay.kind == "npz" and lay.label_names == ["label"] and len(lay.cases) == 7 and lay.problems == []
    assert [c.labels["label"] for c in lay.cases] == [0, 1, 1, 0, 1, 1, 0]
    assert [c.split for c in lay.cases] == ["train"] * 5 + ["test"] * 2
    np.savez(tmp_path / "ml.npz", train_images=np.zeros((3, 4, 4, 3), np.uint8), train_labels=np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0]]))
    lay = load_layout(tmp_path / "ml.npz", "npz")
    assert lay.label_names == ["label_0", "label_1", "label_2"]
    assert lay.cases[2].labels == {"label_0": 1.0, "label_1": 1.0, "label_2": 0.0}
    np.savez(tmp_path / "mc.npz", train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.array([[0], [4], [2]]))
    lay = load_layout(tmp_path / "mc.npz", "npz")
    assert lay.label_names == [f"class_{i}" for i in range(5)]
    assert lay.cases[1].labels["class_4"] == 1.0 and sum(lay.cases[1].labels.values()) == 1.0 and lay.cases[1].grade == 4


def test_npz_bad_shapes_and_object_arrays(tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.array([[0], [1]]))
    lay = load_layout(tmp_path / "bad.npz", "npz")
    assert any("2 rows but train_images has 3" in p for p in lay.problems)
    np.savez(tmp_path / "obj.npz", train_images=np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(MedcfxError, match="no pickle"):
        load_layout(tmp_path / "obj.npz", "npz")
    np.savez(tmp_path / "none.npz", x=np.zeros(3))
    with pytest.raises(MedcfxError, match="no train_images"):
        load_layout(tmp_path / "none.npz", "npz")


def test_plain_image_folder_is_unlabelled(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        write_png(tmp_path / f"{i}.png", _img(rng))
    (tmp_path / "notes.txt").write_text("not an image")
    lay = detect_layout(tmp_path)
    assert lay.kind == "folder" and lay.problems == [] and len(lay.cases) == 3
    assert all(math.isnan(c.labels["abnormal"]) for c in lay.cases)
    from medcfx.data.preprocess import PreprocessConfig, prepare

    ss = prepare(tmp_path, PreprocessConfig(size=8), cache_dir=tmp_path / "cache")
    assert len(ss) == 3 and np.isnan(ss.labels).all()
