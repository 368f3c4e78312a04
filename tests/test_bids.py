"""The BIDS layout (medcfx/data/layouts_bids.py): detection, cases per subject/session, channels by BIDS
suffix in the chosen order, lesion masks from derivatives/, every ambiguity a listed problem or a stated
choice, and `data check` / `explain` on a real tree written with nibabel."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import cli_env, run_cli
from test_data_helpers import brain_mask, write_nii

from medcfx.data.layouts import detect_kind, detect_layout, load_layout
from medcfx.data.layouts_bids import parse_bids_name
from medcfx.errors import MedcfxError

SHAPE = (16, 16, 8)
LESION = (slice(6, 10), slice(7, 11), slice(3, 6))
MODS3 = ("t1", "t2", "flair")


def _affine(seed: int) -> np.ndarray:
    a = np.diag([1.1, 1.3, 2.5, 1.0])
    a[:3, 3] = [-9.0 - seed, 4.0 + seed, -3.0]
    return a


def _volume(rng, lesion: bool, bright: float = 1.0) -> np.ndarray:
    v = (rng.gamma(4.0, 50.0, size=SHAPE) + 10.0) * brain_mask(SHAPE)
    if lesion:
        v[LESION] *= 3.0 * bright
    return v.astype(np.float32)


def _session(anat, prefix, seed, suffix=".nii.gz", ce=False, lesion=False, skip=()):
    rng = np.random.default_rng(seed)
    files = {}
    for key, name in (("t1", "T1w"), ("t2", "T2w"), ("flair", "FLAIR")) + ((("t1ce", "ce-gadolinium_T1w"),) if ce else ()):
        if key in skip:
            continue
        files[key] = write_nii(anat / f"{prefix}_{name}{suffix}", _volume(rng, lesion and key == "flair"), _affine(seed))
    (anat / f"{prefix}_T1w.json").write_text("{}")  # a sidecar: not a channel
    return files


def _mask(path, seed):
    m = np.zeros(SHAPE, np.uint8)
    m[LESION] = 1
    return write_nii(path, m, _affine(seed))


def write_bids(root, flair_missing=False):
    """sub-01 (no session, a contrast-enhanced T1w, a lesion mask in derivatives/lesions) and sub-02 with two
    sessions (ses-2 stored as .nii). derivatives/ also holds fMRIPrep's brain mask and medcfx's own output."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    f = {"sub-01": _session(root / "sub-01" / "anat", "sub-01", 1, ce=True, lesion=True),
         "sub-02_ses-1": _session(root / "sub-02" / "ses-1" / "anat", "sub-02_ses-1", 2),
         "sub-02_ses-2": _session(root / "sub-02" / "ses-2" / "anat", "sub-02_ses-2", 3, suffix=".nii",
                                  skip=("flair",) if flair_missing else ())}
    lesions = root / "derivatives" / "lesions"
    lesions.mkdir(parents=True)
    (lesions / "dataset_description.json").write_text(json.dumps({"Name": "manual", "DatasetType": "derivative"}))
    f["mask"] = _mask(lesions / "sub-01" / "anat" / "sub-01_label-lesion_mask.nii.gz", 1)
    _mask(root / "derivatives" / "fmriprep" / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_desc-brain_mask.nii.gz", 2)
    own = root / "derivatives" / "medcfx"  # what medcfx may write later: never subjects, never masks
    _session(own / "sub-02" / "ses-2" / "anat", "sub-02_ses-2", 3)
    _mask(own / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_label-lesion_mask.nii.gz", 3)
    return f


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "bids"
    return root, write_bids(root)


def test_parse_bids_name():
    assert parse_bids_name("sub-01_ses-2_ce-gad_run-1_T1w.nii.gz") == ({"sub": "01", "ses": "2", "ce": "gad", "run": "1"}, "T1w")
    assert parse_bids_name("sub-01_FLAIR.nii") == ({"sub": "01"}, "FLAIR")
    for bad in ("T1w.nii.gz", "sub-01_run_T1w.nii.gz", "ses-1_sub-01_T1w.nii.gz", "sub-01_sub-02_T1w.nii.gz"):
        assert parse_bids_name(bad) is None, bad


def test_layout_cases_channels_in_chosen_order_and_masks(tree):
    root, f = tree
    assert detect_kind(root) == "bids"
    lay = detect_layout(root, modalities=("flair", "t1", "t2"))
    assert lay.kind == "bids" and lay.dims == 3 and lay.problems == []
    assert lay.channels == ["flair", "t1", "t2"] and lay.label_names == ["unhealthy"]
    assert [c.id for c in lay.cases] == ["sub-01", "sub-02_ses-1", "sub-02_ses-2"]  # nothing from derivatives/
    by_id = {c.id: c for c in lay.cases}
    for cid, case in by_id.items():
        assert case.channels == [f[cid]["flair"], f[cid]["t1"], f[cid]["t2"]]
    assert by_id["sub-02_ses-2"].channels[0].name == "sub-02_ses-2_FLAIR.nii"
    assert by_id["sub-01"].mask == f["mask"]
    assert by_id["sub-02_ses-1"].mask is None  # fMRIPrep's brain mask is not a lesion mask
    assert by_id["sub-02_ses-2"].mask is None  # derivatives/medcfx is never read
    assert (root / "dataset_description.json") in lay.extra_files
    text = "\n".join(lay.info)
    assert "derivatives/lesions" in text and "fmriprep 1" in text and "medcfx's own output" in text
    assert "ce-T1w 1" in text  # the unused contrast-enhanced T1w is counted, not silently dropped


def test_t1ce_is_the_contrast_enhanced_t1w_and_a_missing_one_is_a_problem(tree):
    root, f = tree
    lay = detect_layout(root)  # the default modalities: t1, t1ce, t2, flair
    assert [c.id for c in lay.cases] == ["sub-01"]
    assert lay.cases[0].channels == [f["sub-01"][m] for m in ("t1", "t1ce", "t2", "flair")]
    assert len(lay.problems) == 2
    assert all("t1ce" in p and "ce-<agent>_T1w" in p for p in lay.problems)
    assert any("sub-02_ses-1" in p for p in lay.problems) and any("sub-02_ses-2" in p for p in lay.problems)


def test_a_subject_or_session_folder_is_that_part_of_the_dataset(tree):
    root, f = tree
    lay = detect_layout(root / "sub-02", modalities=MODS3)
    assert lay.kind == "bids" and [c.id for c in lay.cases] == ["sub-02_ses-1", "sub-02_ses-2"]
    lay = detect_layout(root / "sub-01", modalities=MODS3)
    assert [c.id for c in lay.cases] == ["sub-01"] and lay.cases[0].mask == f["mask"]  # masks from the root's derivatives
    lay = detect_layout(root / "sub-02" / "ses-2", modalities=MODS3)
    assert [c.id for c in lay.cases] == ["sub-02_ses-2"] and lay.problems == []
    anat = root / "sub-02" / "ses-1" / "anat"  # its names end in _T2w/_FLAIR like BraTS 2023's: still BIDS
    assert detect_kind(anat) == "bids" and [c.id for c in detect_layout(anat, modalities=MODS3).cases] == ["sub-02_ses-1"]
    assert load_layout(root / "dataset_description.json", "bids", MODS3).root == root


def test_runs_acquisitions_and_several_masks_are_problems_and_pipelines_a_stated_choice(tree):
    root, f = tree
    anat = root / "sub-02" / "ses-1" / "anat"
    f["sub-02_ses-1"]["t1"].rename(anat / "sub-02_ses-1_run-1_T1w.nii.gz")
    write_nii(anat / "sub-02_ses-1_run-2_T1w.nii.gz", np.ones(SHAPE, np.float32), _affine(2))
    write_nii(anat / "sub-02_ses-1_acq-fast_FLAIR.nii.gz", np.ones(SHAPE, np.float32), _affine(2))
    # a second pipeline with a lesion mask for sub-01: the first by name (a-tumour) is used, and said
    other = _mask(root / "derivatives" / "a-tumour" / "sub-01" / "anat" / "sub-01_desc-tumor_dseg.nii.gz", 1)
    # two lesion masks of one case in one pipeline: a problem
    _mask(root / "derivatives" / "lesions" / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_label-lesion_mask.nii.gz", 3)
    _mask(root / "derivatives" / "lesions" / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_label-WMH_mask.nii.gz", 3)
    lay = detect_layout(root, modalities=MODS3)
    assert [c.id for c in lay.cases] == ["sub-01"] and lay.cases[0].mask == other
    assert len(lay.problems) == 3, lay.problems
    runs = next(p for p in lay.problems if "modality t1 " in p)
    assert "sub-02_ses-1_run-1_T1w.nii.gz" in runs and "sub-02_ses-1_run-2_T1w.nii.gz" in runs
    acq = next(p for p in lay.problems if "modality flair " in p)
    assert "sub-02_ses-1_acq-fast_FLAIR.nii.gz" in acq and "sub-02_ses-1_FLAIR.nii.gz" in acq
    masks = next(p for p in lay.problems if "several lesion masks" in p)
    assert "sub-02_ses-2" in masks and "label-WMH" in masks
    assert any("several pipelines (a-tumour, lesions)" in i and "a-tumour" in i and "sub-01" in i for i in lay.info)


def test_refused_and_reported_structures(tmp_path):
    root = tmp_path / "bids"
    write_bids(root)
    # a file whose sub- entity is not its folder's, a badly named subject folder, a subject mixing
    # sessions with a session-less anat/
    (root / "sub-01" / "anat" / "sub-01_T2w.nii.gz").rename(root / "sub-01" / "anat" / "sub-03_T2w.nii.gz")
    (root / "sub-0_1").mkdir()
    _session(root / "sub-02" / "anat", "sub-02", 4)
    lay = detect_layout(root, modalities=MODS3)
    text = "\n".join(lay.problems)
    assert "sub-03_T2w.nii.gz: its sub-/ses- entities do not match" in text
    assert "case sub-01 is missing modality t2" in text
    assert "sub-0_1: not a BIDS subject folder name" in text
    assert "holds both ses-* folders and an anat/ folder" in text
    assert [c.id for c in lay.cases] == ["sub-02_ses-1", "sub-02_ses-2"]
    # medcfx's own derivative is refused as an input
    own = root / "derivatives" / "medcfx"
    (own / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "DatasetType": "derivative", "GeneratedBy": [{"Name": "medcfx"}]}))
    with pytest.raises(MedcfxError, match="written by medcfx"):
        detect_layout(own, modalities=MODS3)
    # a description without subjects
    (tmp_path / "nosubs").mkdir()
    (tmp_path / "nosubs" / "dataset_description.json").write_text("{}")
    assert "no sub-<label> subject folders" in detect_layout(tmp_path / "nosubs").problems[0]


def test_data_check_cli_good_tree_and_missing_flair(tmp_path, home):
    env = cli_env(home)
    good = tmp_path / "good"
    write_bids(good)
    p = run_cli(["data", "check", good, "--modalities", "t1,t2,flair", "--json"], env=env, check=0)
    rep = json.loads(p.stdout)
    assert rep["kind"] == "bids" and rep["ok"] and rep["problems"] == [] and rep["cases"] == 3
    assert rep["channels"] == list(MODS3) and rep["label_counts"]["cases"]["with lesion"] == 1
    bad = tmp_path / "bad"
    write_bids(bad, flair_missing=True)
    p = run_cli(["data", "check", bad, "--modalities", "t1,t2,flair"], env=env)
    assert p.returncode == 1
    assert "case sub-02_ses-2 is missing modality flair" in p.stdout and "1 problem(s)" in p.stdout


def test_explain_threshold_writes_one_case_folder_per_session_on_the_input_grid(tmp_path, home):
    env = cli_env(home)
    root = tmp_path / "bids"
    f = write_bids(root)
    out = tmp_path / "out"
    run_cli(["explain", root, "--method", "threshold", "--set", "preprocess.modalities=[t1,t2,flair]",
             "--out", out], env=env, check=0)
    cases = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "derivatives")  # the BIDS view
    assert cases == ["sub-01", "sub-02_ses-1", "sub-02_ses-2"]
    for cid in cases:
        heat = nib.load(str(out / cid / "heatmap.nii.gz"))
        t1 = nib.load(str(f[cid]["t1"]))
        assert heat.shape == t1.shape
        np.testing.assert_allclose(heat.affine, t1.affine)


def test_explain_of_a_bids_dataset_writes_a_bids_derivative(tmp_path, home):
    """out/derivatives/medcfx: dataset_description.json (a derivative generated by medcfx) and per
    subject/session anat/sub-X[_ses-Y]_desc-heatmap.nii.gz (+ counterfactuals for a model) holding exactly
    the case folder's maps; the derivative is never read back as subjects."""
    import json

    from medcfx.data.layouts import detect_layout

    env = cli_env(home)
    root = tmp_path / "bids"
    write_bids(root)
    out = tmp_path / "out"
    run_cli(["explain", root, "--method", "threshold", "--set", "preprocess.modalities=[t1,t2,flair]",
             "--out", out], env=env, check=0)
    deriv = out / "derivatives" / "medcfx"
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "medcfx"
    expected = {"sub-01": deriv / "sub-01" / "anat" / "sub-01_desc-heatmap.nii.gz",
                "sub-02_ses-1": deriv / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_desc-heatmap.nii.gz",
                "sub-02_ses-2": deriv / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_desc-heatmap.nii.gz"}
    for case, path in expected.items():
        assert path.read_bytes() == (out / case / "heatmap.nii.gz").read_bytes()
    assert sorted(p.name for p in deriv.rglob("*.nii.gz")) == sorted(p.name for p in expected.values())
    # the dataset with its derivative inside still reads as the same three cases
    assert len(detect_layout(root, modalities=["t1", "t2", "flair"]).cases) == 3


def test_derivative_names_follow_bids_and_other_folders_are_left_out(tmp_path):
    from medcfx.bids_out import write_derivative

    case = tmp_path / "sub-07_ses-pre"
    case.mkdir()
    names = ["heatmap.nii.gz", "mask.nii.gz", "counterfactual_t1.nii.gz", "counterfactual_t1ce.nii.gz",
             "counterfactual_t2.nii.gz", "counterfactual_flair.nii.gz", "provenance.json"]
    for n in names:
        (case / n).write_bytes(n.encode())
    (tmp_path / "not_bids_case").mkdir()
    deriv = write_derivative(tmp_path, [tmp_path / "src"])
    anat = deriv / "sub-07" / "ses-pre" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == sorted(
        f"sub-07_ses-pre_{s}.nii.gz" for s in ("desc-heatmap", "desc-lesion_mask", "desc-counterfactual_T1w",
                                               "ce-gadolinium_desc-counterfactual_T1w", "desc-counterfactual_T2w",
                                               "desc-counterfactual_FLAIR"))
    assert (anat / "sub-07_ses-pre_desc-lesion_mask.nii.gz").read_bytes() == b"mask.nii.gz"
    assert sorted(p.name for p in deriv.iterdir()) == ["dataset_description.json", "sub-07"]
