"""The thresholding baseline's own steps (issue 18): the native grid (preprocess.size 0) is the identity on
any in-plane shape and storage orientation, --channel auto picks the channel of best validation AP
(checked against scikit-learn per channel), and what cannot use a native size refuses it."""

import json

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from conftest import cli_env, run_cli
from medcfx.data.preprocess import PreprocessConfig, prepare
from medcfx.errors import UsageError
from medcfx.inputs import iter_cases


def _volume(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.mark.parametrize("codes", ["RAS", "LPS"])
def test_native_size_keeps_every_voxel_of_a_non_square_volume(tmp_path, codes):
    """size 0: each slice at its own in-plane size; mapping the model slices back gives the scaled input
    voxel for voxel (no resampling), whatever the storage orientation (nibabel flips the storage)."""
    rng = np.random.default_rng(0)
    ras = np.zeros((30, 20, 6), np.float32)
    ras[3:27, 2:18] = rng.uniform(50, 150, (24, 16, 6)).astype(np.float32)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    data = ras
    if codes == "LPS":  # the same image stored with x and y reversed
        data = ras[::-1, ::-1].copy()
        affine = np.diag([-1.5, -1.0, 2.0, 1.0])
        affine[:3, 3] = [1.5 * 29, 1.0 * 19, 0]
    _volume(tmp_path / "vol.nii.gz", data, affine)
    case = next(iter_cases(tmp_path / "vol.nii.gz", PreprocessConfig(size=0, percentile=50, clip=False,
                                                                       min_foreground=0), 1))
    assert case.images.shape == (6, 1, 30, 30)  # the square side max(30, 20)
    fg = data != 0
    want = np.where(fg, data / np.median(data[fg]), 0)
    back = case.to_original((case.images[:, 0] + 1) / 2)
    np.testing.assert_allclose(back, want, rtol=1e-6, atol=1e-6)


def test_a_model_cannot_be_trained_or_prepared_at_the_native_size(tmp_path):
    with pytest.raises(UsageError, match="preprocess.size 0 \\(native\\) is for the thresholding baseline only"):
        prepare(tmp_path, PreprocessConfig(size=0))
    with pytest.raises(UsageError, match="\\[4, 4096\\] or 0"):
        PreprocessConfig(size=2)


def _cases(root, flair_lesion: bool, n: int, seed: int):
    """n cases with 3 channels: a lesion that is bright in FLAIR or bright in T2 only."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"case{i}"
        d.mkdir(parents=True)
        brain = np.zeros((24, 24, 8), bool)
        brain[3:21, 3:21, 1:7] = True
        seg = np.zeros(brain.shape, np.uint8)
        x0, y0 = rng.integers(5, 14, 2)
        seg[x0:x0 + 5, y0:y0 + 5, 3:5] = 1
        for name, bright in (("t1", False), ("t2", not flair_lesion), ("flair", flair_lesion)):
            v = np.where(brain, rng.normal(100, 10, brain.shape), 0).astype(np.float32)
            if bright:
                v[seg > 0] += 60
            _volume(d / f"case{i}_{name}.nii.gz", v, np.eye(4))
        _volume(d / f"case{i}_seg.nii.gz", seg, np.eye(4))


@pytest.mark.parametrize("flair_lesion,want", [(True, "flair"), (False, "t2")])
def test_channel_auto_takes_the_channel_of_best_validation_ap(tmp_path, home, flair_lesion, want):
    _cases(tmp_path / "val", flair_lesion, 2, seed=1)
    _cases(tmp_path / "test", flair_lesion, 2, seed=2)
    env = cli_env(home)
    mods = ["--set", "preprocess.modalities=[t1,t2,flair]", "--median-filter", "1", "--n-resamples", "0"]
    p = run_cli(["evaluate", "threshold", "--data", tmp_path / "test", "--val", tmp_path / "val", "--channel", "auto",
                 "--out", tmp_path / "ev", *mods], env=env, check=0)
    rep = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert rep["channel"] == want and f"--channel auto: {want}" in " ".join((p.stdout + p.stderr).split())
    assert str(tmp_path / "ev" / "metrics.json") in "".join((p.stdout + p.stderr).split())  # says where it wrote
    # the validation AP of each channel, recomputed with scikit-learn from the files (/ median, no filter)
    for ch, got in rep["channel_choice"]["validation_AP"].items():
        s, y = [], []
        for d in sorted((tmp_path / "val").iterdir()):
            v = np.asarray(nib.load(str(d / f"{d.name}_{ch}.nii.gz")).dataobj, np.float64)
            seg = np.asarray(nib.load(str(d / f"{d.name}_seg.nii.gz")).dataobj) > 0
            fg = v != 0
            s.append((v / np.median(v[fg]))[fg])
            y.append(seg[fg])
        assert got == pytest.approx(average_precision_score(np.concatenate(y), np.concatenate(s)), abs=1e-3)
    # auto without --val, and auto for explain: refused before any work
    p = run_cli(["evaluate", "threshold", "--data", tmp_path / "test", "--channel", "auto", "--out", tmp_path / "x",
                 *mods], env=env)
    assert p.returncode == 2 and "give --val" in p.stderr and not (tmp_path / "x").exists()
    p = run_cli(["explain", tmp_path / "test", "--method", "threshold", "--channel", "auto", "--out", tmp_path / "y",
                 "--set", "preprocess.modalities=[t1,t2,flair]"], env=env)
    assert p.returncode == 2 and "--channel auto is chosen on validation data" in p.stderr
    assert not (tmp_path / "y").exists()


def test_bad_threshold_settings_are_refused_before_any_work_and_provenance_says_what_ran(tmp_path, home):
    from medcfx.demo import make_demo

    make_demo("brain", tmp_path / "d", cases=1, seed=0, shape=(32, 32, 10), tumour_free_fraction=0.0)
    case = next(p for p in (tmp_path / "d").iterdir() if p.is_dir())
    env = cli_env(home)
    for args, says in ((["--median-filter", "4"], "odd number of pixels"), (["--median-filter", "33"], "--median-filter"),
                       (["--model", "sanchez-demo"], "threshold has no model"), (["--channel", "nosuch"], "the input's channels are")):
        p = run_cli(["explain", case, "--method", "threshold", "--out", tmp_path / "x", *args], env=env)
        assert p.returncode == 2 and says in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
        assert not (tmp_path / "x").exists()
    p = run_cli(["explain", case, "--method", "threshold", "--out", tmp_path / "o", "--channel", "t2",
                 "--median-filter", "3"], env=env, check=0)
    prov = json.loads((tmp_path / "o" / case.name / "provenance.json").read_text())
    assert prov["params"]["channel"] == "t2" and prov["params"]["median_filter"] == 3
    assert prov["params"]["size"] == "native"
    # no model to store a calibration with: the summary says how to get thresholded Dice instead
    assert "medcfx evaluate threshold --val" in json.loads(p.stdout)["calibration"]


@pytest.mark.parametrize("method", [["threshold", "--channel", "auto"], ["threshold"],
                                    ["restoration", "--model", "restoration-demo"]])
def test_an_unreadable_test_set_is_refused_before_the_validation_pass(tmp_path, home, method):
    """evaluate --val reads the validation set first (calibration, --channel auto); a test set that cannot be
    read (a case without a modality) must be refused before that work, not after it. The validation set here
    holds a corrupt file: had it been read first, the error would name it instead."""
    _cases(tmp_path / "val", True, 1, seed=1)
    _cases(tmp_path / "test", True, 2, seed=2)
    for f in (tmp_path / "val" / "case0").iterdir():
        f.write_bytes(b"not a NIfTI file")
    (tmp_path / "test" / "case1" / "case1_t2.nii.gz").unlink()
    mods = ["--set", "preprocess.modalities=[t1,t2,flair]"] if method[0] == "threshold" else []
    p = run_cli(["evaluate", *method, "--data", tmp_path / "test", "--val", tmp_path / "val", "--out", tmp_path / "ev",
                 "--device", "cpu", *mods], env=cli_env(home))
    assert p.returncode != 0 and "case1 is missing modality t2" in p.stderr, p.stderr
    assert "val" not in p.stderr.replace(str(tmp_path / "test"), "") and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "ev").exists()


def test_evaluate_says_each_reader_note_once(tmp_path, home):
    """What the readers noticed about a case (here a z-scored FLAIR whose background is not 0) is said by
    evaluate as explain says it, once, although --channel auto reads the cases once per channel."""
    _cases(tmp_path / "val", True, 1, seed=1)
    _cases(tmp_path / "test", True, 2, seed=2)
    f = tmp_path / "test" / "case1" / "case1_flair.nii.gz"
    v = np.asarray(nib.load(str(f)).dataobj, np.float64)
    _volume(f, ((v - v.mean()) / v.std()).astype(np.float32), np.eye(4))  # z-scored: background = -mean/sd
    p = run_cli(["evaluate", "threshold", "--channel", "auto", "--data", tmp_path / "test", "--val", tmp_path / "val",
                 "--out", tmp_path / "ev", "--set", "preprocess.modalities=[t1,t2,flair]", "--n-resamples", "0"],
                env=cli_env(home), check=0)
    text = " ".join((p.stdout + p.stderr).split())
    notes = [ln for ln in text.split("note: ")[1:]]
    assert len(notes) == 1 and notes[0].startswith("case1:") and "background value" in notes[0], text
    # the same note of a same-named case in the validation set and in the test set: said for each set
    for folder in (tmp_path / "val", tmp_path / "test"):
        for f in (folder / "case0").glob("*.nii.gz"):
            img = nib.load(str(f))
            img.set_qform(None, code=0)
            img.set_sform(None, code=0)
            nib.save(img, str(f))
    p = run_cli(["evaluate", "threshold", "--channel", "auto", "--data", tmp_path / "test", "--val", tmp_path / "val",
                 "--out", tmp_path / "ev2", "--set", "preprocess.modalities=[t1,t2,flair]", "--n-resamples", "0"],
                env=cli_env(home), check=0)
    text = " ".join((p.stdout + p.stderr).split())
    header = [n for n in text.split("note: ")[1:] if n.startswith("case0:") and "no orientation" in n]
    assert len(header) == 2, text  # once for brain-val's case0, once for the test set's


def test_evaluate_says_why_metrics_are_undefined(tmp_path, home):
    """A test set whose scored slices hold no lesion voxel gives nan pixel and image metrics; evaluate says
    why, instead of a table of nan alone."""
    from medcfx.evaluation import undefined_metrics

    _cases(tmp_path / "test", True, 1, seed=2)
    seg = tmp_path / "test" / "case0" / "case0_seg.nii.gz"
    _volume(seg, np.zeros((24, 24, 8), np.uint8), np.eye(4))
    p = run_cli(["evaluate", "threshold", "--data", tmp_path / "test", "--out", tmp_path / "ev", "--n-resamples", "0",
                 "--set", "preprocess.modalities=[t1,t2,flair]"], env=cli_env(home), check=0)
    rep = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert rep["metrics"]["pixel_AUPRC"] is None and rep["metrics"]["image_AUROC"] is None  # nan is written as null
    text = " ".join((p.stdout + p.stderr).split())
    assert "note: no lesion voxels in the scored slices" in text and "note: no scored slice has a lesion" in text
    # the rule itself: defined metrics say nothing; all-lesion or all-positive sets are undefined too
    assert undefined_metrics({"lesion_pixels": 5, "pixels": 100, "images": 4, "positive_images": 2}) == []
    assert len(undefined_metrics({"lesion_pixels": 100, "pixels": 100, "images": 4, "positive_images": 4})) == 2
    assert len(undefined_metrics(rep["counts"])) == 2
