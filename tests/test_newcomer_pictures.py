"""Pictures worth reading (issue 20): explain panels on the input's grid in the radiological convention with a
fixed, stated colour scale and a colour bar; the grade strip at the input's size with a legend and a note for
targets not reached; progress.png during training with labelled axes.

Checked from the figure objects (tiles, colour bar axes and label, titles, texts) and from the PNGs' sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image

from conftest import cli_env, run_cli
from medcfx import figures
from medcfx.data.geometry import SliceGeometry
from medcfx.data.preprocess import PreprocessConfig
from medcfx.inputs import load_cases
from medcfx.scoring import Decision, native_map

ROOT = Path(__file__).resolve().parents[1]
SHAPE_RAS = (40, 36, 10)  # R-L 40 voxels, P-A 36, I-S 10


def _phantom(codes: str, tmp: Path) -> Path:
    """An ellipsoid "brain" whose patient-LEFT half is bright and whose anterior rim is brighter still,
    stored in the orientation ``codes`` (nibabel axis codes of the storage axes, e.g. LPS, PIL)."""
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in SHAPE_RAS), indexing="ij")  # RAS+ mm
    brain = (x / 18) ** 2 + (y / 16) ** 2 + (z / 8) ** 2 <= 1
    data = np.where(brain, 100.0, 0.0)
    data[brain & (x < 0)] = 300.0  # x runs towards the patient's Right: x < 0 is the patient's left
    data[brain & (y > 10)] += 150.0  # y runs towards Anterior
    ras = nib.Nifti1Image(data.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    from nibabel.orientations import axcodes2ornt, ornt_transform

    img = ras.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes))))
    assert "".join(nib.aff2axcodes(img.affine)) == codes
    path = tmp / f"phantom_{codes}.nii.gz"
    nib.save(img, str(path))
    return path


def _case(path: Path):
    return load_cases(path, PreprocessConfig(size=16, min_foreground=0.3), 1)[0]


def _panels(case, decision=None, heat=None, overlay=False):
    if heat is None:
        heat = native_map(case, (case.images[:, 0] + 1) / 2)
    return figures.CasePanels(case, [("input", case.images[:, 0]), ("counterfactual", case.images[:, 0])], heat,
                              figures.MapScale("heatmap = test map", 0.8), channel="image", model="test-model:1",
                              map_title="heatmap", overlay=overlay, decision=decision)


def _colour_bars(fig) -> list:
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def _middle(case) -> int:
    return len(case.slice_index) // 2


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIL"])
def test_panels_are_radiological_whatever_the_storage_order(codes, tmp_path):
    """Patient's left (bright) is on the viewer's right, anterior (brighter rim) at the top, and the picture
    is the same for every storage order of the same anatomy."""
    case = _case(_phantom(codes, tmp_path))
    fig = _panels(case).figure(_middle(case))
    tile = np.asarray(fig.images[0].get_array())[..., 0]  # the input tile, float grey in [0, 1]
    h, w = tile.shape
    left, right = tile[:, : w // 2], tile[:, w // 2:]
    assert right[right > 0.05].mean() > left[left > 0.05].mean() + 0.2  # the patient's left on the viewer's right
    top, bottom = tile[: h // 4], tile[3 * h // 4:]
    assert top[top > 0.05].mean() > bottom[bottom > 0.05].mean() + 0.1  # anterior up
    # the letters at the input tile's edges name the sides
    letters = {t.get_text() for t in fig.texts}
    assert {"R", "L", "A", "P"} <= letters
    if codes != "RAS":
        ref = _case(_phantom("RAS", tmp_path))
        same = np.asarray(_panels(ref).figure(_middle(ref)).images[0].get_array())
        np.testing.assert_allclose(np.asarray(fig.images[0].get_array()), same, atol=1e-5)


def test_panel_is_on_the_input_grid_with_a_stated_colour_bar_and_a_full_title(tmp_path):
    case = _case(_phantom("LPS", tmp_path))
    heat = native_map(case, (case.images[:, 0] + 1) / 2)
    thr = 0.7
    dec = Decision(heat > thr, thr, "fpr0.05", 1, [1.0], 1.0, "ml", float(heat.max()), "lesion")
    panels = _panels(case, decision=dec, heat=heat, overlay=True)
    j = _middle(case)
    k = int(case.slice_index[j])
    fig = panels.figure(j)
    # title: slice index, channel and model
    title = fig._suptitle.get_text()
    assert f"slice {k}" in title and "channel image" in title and "model test-model:1" in title
    # tiles at (a whole multiple of) the input's in-plane size, never the model's 16 px: R-L 40 x A-P 36 shown
    # as rows A-P (36) x columns R-L (40)
    tiles = [np.asarray(im.get_array()) for im in fig.images]
    assert len(tiles) == 4  # input, counterfactual, heatmap, overlay
    f = figures.tile_factor((36, 40))
    assert all(t.shape[:2] == (36 * f, 40 * f) for t in tiles)
    # one colour bar, its label stating the map and the fixed range; the threshold marked on it
    bars = _colour_bars(fig)
    assert len(bars) == 1
    label = bars[0].get_xlabel()
    assert "heatmap = test map" in label and "fixed colour scale 0 to 0.8" in label
    assert "saturate" in label  # the phantom's map reaches 1 > 0.8
    assert bars[0].get_xlim() == pytest.approx((0.0, 0.8))
    assert any(np.allclose(line.get_xdata(), thr) for line in bars[0].lines)
    # the heatmap only inside the brain: outside it the heat tile equals the input tile (grey)
    region = case.scored_region
    inside = panels._slice(panels.region, k)
    assert region.sum() == panels.region.sum() and not inside.all()
    outside = ~figures.enlarge(inside, f)
    np.testing.assert_allclose(tiles[2][outside], tiles[0][outside])
    grey = np.ptp(tiles[2][~outside & ~np.isclose(tiles[2], to_rgb(figures.DECISION_COLOUR)).all(-1)], axis=-1)
    assert (grey > 0.05).mean() > 0.9  # coloured (not grey) inside the brain
    # the decision's outline on the heatmap
    assert np.isclose(tiles[2], to_rgb(figures.DECISION_COLOUR)).all(-1).any()
    # written: one PNG per explained slice, named by the slice index, at least the tiles' size
    paths = panels.write(tmp_path / "out")
    assert [p.name for p in paths] == [f"slice_{int(s):03d}.png" for s in case.slice_index]
    w, h = Image.open(paths[j]).size
    assert w >= 4 * 40 * f and h >= 36 * f


def test_2d_image_panel_is_shown_as_stored(tmp_path):
    img = np.zeros((30, 50), np.uint8)
    img[:, 25:] = 200  # right half bright, as stored
    path = tmp_path / "a.png"
    Image.fromarray(img).save(path)
    case = load_cases(path, PreprocessConfig(size=16), 1)[0]
    fig = _panels(case).figure(0)
    tile = np.asarray(fig.images[0].get_array())[..., 0]
    f = figures.tile_factor((30, 50))
    assert tile.shape == (30 * f, 50 * f)
    assert tile[:, -10:].mean() > tile[:, :10].mean() + 0.3
    assert "2D image" in fig._suptitle.get_text() and "R" not in {t.get_text() for t in fig.texts}


def test_threshold_explain_writes_the_panels_at_the_input_size(tmp_path):
    """The real command on a small BraTS-like case folder (threshold: no model needed)."""
    from medcfx.demo import make_demo

    make_demo("brain", tmp_path / "d", cases=1, seed=0, shape=(40, 36, 10), tumour_free_fraction=0.0)
    case = next(p for p in (tmp_path / "d").iterdir() if p.is_dir())
    env = cli_env(tmp_path / "home")
    res = run_cli(["explain", case, "--method", "threshold", "--out", tmp_path / "o"], env=env, check=0)
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    folder = Path(summary["cases"][0]["folder"])
    prov = json.loads((folder / "provenance.json").read_text())
    names = sorted(p.name for p in (folder / "panels").iterdir())
    assert names == [f"slice_{k:03d}.png" for k in sorted(prov["slices"])]
    w, h = Image.open(folder / "panels" / names[0]).size
    f = figures.tile_factor((36, 40))
    assert w >= 3 * 40 * f and h >= 36 * f  # input, heatmap, annotation; each at least the input's size
    assert prov["params"]["panel_colour_scale"] == [0.0, 3.0]  # the baseline's fixed range: u = x / median


# ------------------------------------------------------------------------------------------------ grade strip


def _fake_analysis(S=48):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, S, S)).astype(np.float32)
    frames = {n: np.clip(x + rng.normal(0, 0.1 * (i + 1), x.shape), -1, 1).astype(np.float32)
              for i, n in enumerate(["reconstruction", "counterfactual", "grade_0", "grade_1", "grade_2", "grade_3"])}
    reads = {"reconstruction": 1.66, "counterfactual": -0.99, "grade_0": 0.004, "grade_1": 1.0004, "grade_2": 1.68,
             "grade_3": 1.64}
    scores = {n: {"grade": g, "distance": 0.0, "probability": 0.5} for n, g in reads.items()}
    return x, frames, scores


def test_grade_targets_not_reached_are_named():
    from medcfx_diffae.strip import GRADE_TOLERANCE, target_check

    _, _, scores = _fake_analysis()
    names = ["grade_0", "grade_1", "grade_2", "grade_3"]
    check = target_check([0.0, 1.0, 2.0, 3.0], names, scores)
    assert check["tolerance"] == GRADE_TOLERANCE == 0.25
    assert check["not_reached"] == ["grade_2", "grade_3"]
    assert check["frames"]["grade_2"]["gap"] == pytest.approx(-0.32) and not check["frames"]["grade_2"]["reached"]
    assert check["frames"]["grade_1"]["reached"]
    assert "G2 (reads 1.68)" in check["note"] and "G3 (reads 1.64)" in check["note"]
    assert target_check([0.0, 1.0], names[:2], scores)["note"] is None


def test_grade_strip_is_drawn_at_the_input_size_with_a_legend_and_the_note():
    from medcfx_diffae.strip import NOT_REACHED_COLOUR, strip_figure, target_check

    x, frames, scores = _fake_analysis()
    names = ["grade_0", "grade_1", "grade_2", "grade_3"]
    grades = [0.0, 1.0, 2.0, 3.0]
    check = target_check(grades, names, scores)
    geom = SliceGeometry((96, 96), None, 48, (0,))  # a 96 x 96 input, a 48 px model
    fig = strip_figure(geom, x, frames, scores, {"grade": 1.67, "grade_rounded": 2}, grades, names, check,
                       flip={"before": 0.99, "after": 0.0, "flipped": True}, title="vertebra.png")
    tiles = [np.asarray(im.get_array()) for im in fig.images]
    assert len(tiles) == 10 and all(t.shape[0] >= 96 and t.shape[1] >= 96 for t in tiles)
    assert fig.bbox.width >= 5 * 96 and fig.bbox.height >= 2 * 96
    bars = _colour_bars(fig)
    assert len(bars) == 1 and "|input - frame|" in bars[0].get_xlabel() and "colour scale 0 to" in bars[0].get_xlabel()
    texts = {t.get_text(): t for t in fig.texts}
    legend = " ".join(texts)
    for said in ("input: the image as the model sees it (48 x 48 px), shown on the input's 96 x 96 px grid",
                 "target Gk:", "reflection:", "|input - Gk|:", "within 0.25"):
        assert said in legend.replace("\n", " "), said
    missed = [t for s, t in texts.items() if "NOT REACHED" in s]
    assert len(missed) == 2 and all(to_rgb(t.get_color()) == to_rgb(NOT_REACHED_COLOUR) for t in missed)
    assert any(s.startswith("Targets not reached: G2 (reads 1.68), G3 (reads 1.64)") for s in texts)


def test_grade_cli_writes_the_strip_at_the_input_size_and_the_targets(tmp_path):
    """The bundled grader on the bundled 96 x 96 vertebra, with few steps (fast): strip.png at least the
    input's size per tile, result.json's targets agree with the frames' read-back grades."""
    env = cli_env(tmp_path / "home")
    proc = run_cli(["grade", ROOT / "models" / "demo-inputs" / "vertebra.png", "--out", tmp_path / "o",
                    "--encode-steps", "20", "--decode-steps", "10", "--inversion-limit", "1"], env=env, check=0)
    folder = tmp_path / "o" / "vertebra"
    result = json.loads((folder / "result.json").read_text())
    w, h = Image.open(folder / "strip.png").size
    assert w >= 5 * 96 and h >= 2 * 96
    t = result["targets"]
    for name, rec in t["frames"].items():
        assert rec["read"] == pytest.approx(result["frames"][name]["score"]["grade"])
        assert rec["reached"] == (abs(rec["read"] - rec["target"]) <= t["tolerance"])
    assert t["not_reached"] == [n for n, r in t["frames"].items() if not r["reached"]]
    assert (t["note"] is not None) == bool(t["not_reached"])
    said = " ".join((proc.stdout + proc.stderr).split())
    assert ("not reached" in said) == bool(t["not_reached"])  # the note is printed too


# ------------------------------------------------------------------------------------------------ progress.png


def test_progress_png_is_written_during_training_with_labelled_axes(tmp_path):
    from medcfx.train import TrainConfig, fit, uniform_batches

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    seen = {}

    def loss_fn(net, batch):
        seen[batch.step] = (tmp_path / "progress.png").exists()
        x = batch.randn(4)
        return net(x).pow(2).mean(), {}

    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, ckpt_every=2, log_every=1)
    fit(model, loss_fn, uniform_batches(16), cfg, tmp_path, progress=False, val_fn=lambda m: 0.5)
    assert seen[0] is False and seen[2] is True  # written at the first checkpoint (after step 2), before the end
    assert Image.open(tmp_path / "progress.png").size == (640, 400)

    fig = figures.training_figure([(s, 1.0 / s) for s in range(1, 301)], [(100, 0.02), (300, 0.01)], title="run")
    ax = [a for a in fig.axes if a.get_xlabel()][0]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "training loss" and "validation loss" in labels
    assert ax.lines[0].get_xdata()[-1] == 300  # the x axis is the step, not the point's position
    assert ax.get_yscale() == "log"  # 1/300 .. 1 spans more than a factor 20
