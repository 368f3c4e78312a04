"""medcfx.viz: windowing, colormap, overlay, panels/grids, atomic PNG writing, the line plot."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medcfx.errors import UsageError
from medcfx.viz import PALETTE, grid, heat_rgb, line_plot, overlay, panel, save_png, to_uint8


def _lum(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]


# ---------------------------------------------------------------- to_uint8


def test_to_uint8_given_window_matches_formula():
    a = np.linspace(-10, 110, 121).reshape(11, 11)
    got = to_uint8(a, 0, 100)
    want = np.round(np.clip(a / 100, 0, 1) * 255)
    assert got.dtype == np.uint8 and got.shape == a.shape
    np.testing.assert_array_equal(got, want)


def test_to_uint8_percentile_window_and_edge_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 64))
    a[0, 0] = 1e6  # one outlier must not squash the rest (99th percentile window)
    a[1, 1] = np.nan
    got = to_uint8(a)
    assert got[0, 0] == 255 and got[1, 1] == 0
    lo, hi = np.nanpercentile(a, 1), np.nanpercentile(a, 99)
    inside = np.isfinite(a) & (a > lo) & (a < hi)
    want = np.round((a[inside] - lo) / (hi - lo) * 255)
    np.testing.assert_allclose(got[inside], want, atol=1)
    assert 80 < got[inside].mean() < 175  # mid-grey on average, not crushed towards 0
    assert (to_uint8(np.full((4, 4), 3.0)) == 0).all()  # constant image
    rgb = to_uint8(rng.random((8, 8, 3)))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8


# ---------------------------------------------------------------- heat_rgb / overlay


def test_heat_rgb_monotone_in_luminance_and_range():
    ramp = np.linspace(0, 1, 1001)[None, :]
    rgb = heat_rgb(ramp)
    assert rgb.shape == (1, 1001, 3) and rgb.dtype == np.uint8
    lum = _lum(rgb[0])
    # strictly increasing except where 8-bit rounding makes neighbours equal
    assert (np.diff(lum) >= -0.8).all()
    assert np.all(np.diff(lum[::20]) > 0)
    assert lum[0] < 10 and lum[-1] > 230  # dark to bright
    # vmax: values at/above vmax saturate, negatives and NaN are the bottom colour
    m = np.array([[-1.0, 0.0, 2.0, 4.0, np.nan]])
    out = heat_rgb(m, vmax=2.0)
    np.testing.assert_array_equal(out[0, 0], out[0, 1])
    np.testing.assert_array_equal(out[0, 2], out[0, 3])
    np.testing.assert_array_equal(out[0, 4], out[0, 1])
    with pytest.raises(UsageError):
        heat_rgb(np.zeros((2, 2, 2)))


def test_overlay_weights_by_heat_and_keeps_zero_regions_grey():
    gray = np.full((10, 10), 128, dtype=np.uint8)
    heat = np.zeros((10, 10))
    heat[:, 5:] = 1.0
    out = overlay(gray, heat, alpha=0.5)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :5], 128)  # no heat: untouched
    top = heat_rgb(np.array([[1.0]]))[0, 0].astype(float)
    np.testing.assert_allclose(out[0, 7], np.round(0.5 * 128 + 0.5 * top), atol=1)
    # RGB heat: constant weight; a 3-channel base works too
    base = np.zeros((10, 10, 3), dtype=np.uint8)
    red = np.zeros((10, 10, 3), dtype=np.uint8)
    red[..., 0] = 200
    out2 = overlay(base, red, alpha=0.25)
    assert (out2[..., 0] == 50).all() and (out2[..., 1:] == 0).all()
    with pytest.raises(UsageError):
        overlay(gray, np.zeros((5, 5)))


# ---------------------------------------------------------------- panel / grid / save_png


def test_panel_sizes_and_pixels_for_gray_and_rgb():
    g = np.zeros((16, 20), dtype=np.float32)
    g[:, 10:] = 1.0  # windowed: left black, right white
    c = np.zeros((16, 20, 3), dtype=np.uint8)
    c[..., 1] = 255  # pure green
    p = panel([g, c], ["gray", "rgb"], scale=3)
    assert isinstance(p, Image.Image) and p.mode == "RGB"
    a = np.asarray(p)
    gap = 4
    assert a.shape[1] == 2 * 20 * 3 + 3 * gap
    th = a.shape[0] - 16 * 3 - 2 * gap  # title band height
    assert 6 <= th <= 24
    # title text is drawn (white pixels) above the first tile only within its band
    assert (a[gap : gap + th, gap : gap + 60] > 200).any()
    tile1 = a[gap + th : gap + th + 48, gap : gap + 60]
    assert (tile1[:, :30] == 0).all() and (tile1[:, 30:] == 255).all()
    tile2 = a[gap + th : gap + th + 48, 2 * gap + 60 : 2 * gap + 120]
    assert (tile2[..., 1] == 255).all() and (tile2[..., [0, 2]] == 0).all()


def test_grid_rows_and_single_channel_axis(tmp_path):
    one = np.full((8, 8, 1), 200, dtype=np.uint8)
    big = np.full((12, 6), 50, dtype=np.uint8)
    im = grid([[one, big], [big]], scale=1)
    a = np.asarray(im)
    # no titles: cells are max(H) x max(W) = 12 x 8 with 4-pixel gaps
    assert a.shape == (2 * 12 + 3 * 4, 2 * 8 + 3 * 4, 3)
    assert (a[4:12, 4:12] == 200).all()
    assert (a[4 + 12 + 4 : 4 + 12 + 4 + 12, 4:10] == 50).all()
    with pytest.raises(UsageError):
        grid([[]])
    out = save_png(im, tmp_path / "sub" / "g.png")
    back = np.asarray(Image.open(out))
    np.testing.assert_array_equal(back, a)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["g.png"]  # no temporary left behind


def test_save_png_arrays_and_atomicity(tmp_path, monkeypatch):
    u16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    p = save_png(u16, tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(p)).astype(np.uint16), u16)
    f = np.linspace(0, 1, 64).reshape(8, 8)
    np.testing.assert_array_equal(np.asarray(Image.open(save_png(f, tmp_path / "b.png"))), to_uint8(f))
    # a failing write leaves neither the target nor a temporary file
    (tmp_path / "c").mkdir()

    def boom(self, fh, format=None, **kw):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        save_png(f, tmp_path / "c" / "x.png")
    assert list((tmp_path / "c").iterdir()) == []


# ---------------------------------------------------------------- line_plot


def _colour_pixels(a: np.ndarray, colour) -> np.ndarray:
    return np.all(np.abs(a.astype(int) - np.array(colour)) <= 40, axis=-1)


def test_line_plot_draws_lines_where_expected(tmp_path):
    up = [float(i) for i in range(50)]
    down = [10.0, 5.0, 0.0]
    p = line_plot({"up": up, "down": down}, tmp_path / "p.png", title="demo", size=(400, 260))
    a = np.asarray(Image.open(p).convert("RGB"))
    assert a.shape == (260, 400, 3)
    # the plot frame: the black rectangle
    dark = np.all(a < 60, axis=-1)
    rows_dark = np.nonzero(dark.sum(1) > 200)[0]
    cols_dark = np.nonzero(dark.sum(0) > 150)[0]
    top, bottom, left, right = rows_dark.min(), rows_dark.max(), cols_dark.min(), cols_dark.max()
    assert bottom - top > 150 and right - left > 250
    for colour, rising in ((PALETTE[0], True), (PALETTE[1], False)):
        m = _colour_pixels(a, colour)
        m[: top + 1] = False  # ignore the legend swatch above the frame
        ys, xs = np.nonzero(m)
        assert xs.size > 100
        # the line spans the plot width and stays inside the frame
        assert xs.min() <= left + 4 and xs.max() >= right - 4
        assert ys.min() > top and ys.max() < bottom
        # it rises (row index falls) or falls as x grows: strong correlation between column and row
        r = np.corrcoef(xs, ys)[0, 1]
        assert (r < -0.95) if rising else (r > 0.95)
    # "up" ends at the top right corner (its max is the global max), "down" ends at the bottom right
    up_m = _colour_pixels(a, PALETTE[0])
    assert up_m[top + 1 : top + 6, right - 6 : right].any()
    down_m = _colour_pixels(a, PALETTE[1])
    assert down_m[bottom - 6 : bottom, right - 6 : right].any()
    # the y range (0 and 49) is printed at the left
    assert dark[:, : left - 2].sum() > 20


def test_line_plot_skips_nonfinite_and_handles_flat(tmp_path):
    p = line_plot({"flat": [2.0, 2.0, float("nan"), 2.0, 2.0]}, tmp_path / "f.png")
    a = np.asarray(Image.open(p).convert("RGB"))
    m = _colour_pixels(a, PALETTE[0])
    m[:20] = False
    ys, xs = np.nonzero(m)
    assert ys.size > 0 and ys.max() - ys.min() <= 3  # a horizontal line in the middle
    h = a.shape[0]
    assert abs(ys.mean() - (22 + (h - 18)) / 2) < 4
    # the NaN breaks the line: a gap of missing columns in the middle
    cols = np.unique(xs)
    assert np.diff(cols).max() > 20
