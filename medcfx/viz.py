"""Small picture helpers shared by every method: windowing, a colormap, overlays, panels, a line plot.

numpy + Pillow only (no matplotlib). Arrays are (H, W) greyscale or (H, W, 3) RGB; floats are windowed to
uint8 with :func:`to_uint8`. Everything written to disk goes through :func:`save_png` (atomic). The figures a
reader has to interpret (explain's slice panels, the grade strip, a run's progress.png) are drawn with
matplotlib in :mod:`medcfx.figures`, which writes through :func:`save_png` too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medcfx import staging
from medcfx.errors import UsageError

# colormap control points (position, R, G, B): black -> purple -> red -> orange -> yellow -> near white,
# chosen so that the luminance 0.2126 R + 0.7152 G + 0.0722 B rises strictly between every pair of points
# (the map is piecewise linear in RGB, so luminance is piecewise linear and hence monotone as well)
_HEAT = np.array(
    [
        [0.000, 0, 0, 4],
        [0.125, 31, 12, 72],
        [0.250, 85, 15, 109],
        [0.375, 136, 34, 106],
        [0.500, 186, 54, 85],
        [0.625, 227, 89, 51],
        [0.750, 249, 140, 10],
        [0.875, 249, 201, 50],
        [1.000, 252, 255, 164],
    ],
    dtype=np.float64,
)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def to_uint8(img: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Window ``img`` to uint8: ``255 * clip((img - lo) / (hi - lo), 0, 1)``.

    ``lo``/``hi`` default to the 1st / 99th percentiles of the finite values (one window for all channels).
    Non-finite values become 0; a constant image (``hi <= lo``) becomes all 0.
    """
    a = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(a)
    if lo is None or hi is None:
        vals = a[finite]
        if vals.size == 0:
            return np.zeros(a.shape, dtype=np.uint8)
        lo = float(np.percentile(vals, 1)) if lo is None else lo
        hi = float(np.percentile(vals, 99)) if hi is None else hi
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = np.clip((np.where(finite, a, lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(out * 255).astype(np.uint8)


def heat_rgb(map: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Colour a non-negative 2-D map: (H, W) -> (H, W, 3) uint8; 0 is black, ``vmax`` (default: the
    maximum) is pale yellow. Negative and non-finite values count as 0; values above ``vmax`` saturate."""
    m = np.asarray(map, dtype=np.float64)
    if m.ndim != 2:
        raise UsageError(f"heat_rgb needs a 2-D map, got shape {m.shape}")
    m = np.where(np.isfinite(m), np.clip(m, 0, None), 0.0)
    top = float(m.max()) if vmax is None else float(vmax)
    x = np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m)
    rgb = np.stack([np.interp(x, _HEAT[:, 0], _HEAT[:, c]) for c in (1, 2, 3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def _rgb(img: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) of any dtype -> (H, W, 3) uint8 (non-uint8 data windowed)."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = a if a.dtype == np.uint8 else to_uint8(a)
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 3:
        return a if a.dtype == np.uint8 else to_uint8(a)
    raise UsageError(f"an image must be (H, W), (H, W, 1) or (H, W, 3), got shape {a.shape}")


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map over a greyscale (or RGB) image -> (H, W, 3) uint8.

    ``heat`` is either a 2-D map (coloured with :func:`heat_rgb`; each pixel's blend weight is
    ``alpha * heat / max(heat)``, so empty regions stay untinted) or an (H, W, 3) RGB image (blended with
    the constant weight ``alpha``).
    """
    base = _rgb(gray).astype(np.float64)
    h = np.asarray(heat)
    if h.ndim == 2:
        colour = heat_rgb(h).astype(np.float64)
        hv = np.where(np.isfinite(h), np.clip(h.astype(np.float64), 0, None), 0.0)
        w = alpha * (hv / hv.max() if hv.max() > 0 else hv)
        w = w[..., None]
    else:
        colour = _rgb(h).astype(np.float64)
        w = float(alpha)
    if colour.shape != base.shape:
        raise UsageError(f"overlay: image {base.shape[:2]} and heat map {colour.shape[:2]} differ in size")
    return np.round((1 - w) * base + w * colour).astype(np.uint8)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    if not text:
        return 0, 0
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=_font())
    return x1 - x0, y1 - y0


def grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[Sequence[str]] | None = None,
    scale: int = 2,
    gap: int = 4,
    background: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Tile images in rows (each (H, W), (H, W, 1) or (H, W, 3)), each enlarged ``scale`` times (nearest
    neighbour), with its title written above it in white (Pillow's default font). Cells are as large as the
    largest image; smaller ones sit at the top left of their cell. Returns an RGB ``PIL.Image``."""
    if not rows or not all(len(r) for r in rows):
        raise UsageError("grid needs at least one image in every row")
    scale = max(1, int(scale))
    tiles = [[_rgb(im) for im in r] for r in rows]
    names = [[(titles[i][j] if titles and i < len(titles) and j < len(titles[i]) else "") for j in range(len(r))]
             for i, r in enumerate(rows)]
    cw = max(t.shape[1] for r in tiles for t in r) * scale
    ch = max(t.shape[0] for r in tiles for t in r) * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    th = max([_text_size(probe, s)[1] for r in names for s in r] + [0])
    th = th + 4 if th else 0
    ncol = max(len(r) for r in tiles)
    W = ncol * cw + (ncol + 1) * gap
    H = len(tiles) * (ch + th) + (len(tiles) + 1) * gap
    canvas = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(tiles):
        y = gap + i * (ch + th + gap)
        for j, t in enumerate(r):
            x = gap + j * (cw + gap)
            if names[i][j]:
                tw, _ = _text_size(draw, names[i][j])
                draw.text((x + max(0, (cw - tw) // 2), y), names[i][j], fill=(255, 255, 255), font=_font())
            big = np.repeat(np.repeat(t, scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(big), (x, y + th))
    return canvas


def outline(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """Draw the boundary of a boolean 2-D ``mask`` (the mask's pixels with a 4-neighbour outside it) in
    ``color`` over an (H, W, 3) uint8 image (or a greyscale (H, W) one); returns a new (H, W, 3) uint8."""
    from scipy import ndimage

    img = np.asarray(rgb)
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img.copy()
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape[:2]:
        raise UsageError(f"outline: mask {m.shape} and image {img.shape[:2]} differ in size")
    edge = m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    img[edge] = color
    return img.astype(np.uint8)


def panel(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, scale: int = 2) -> Image.Image:
    """One row of images side by side, each with its title above it (see :func:`grid`)."""
    return grid([list(images)], [list(titles)] if titles else None, scale=scale)


def save_png(img: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write a PNG atomically (temporary file in the same folder, then rename); creates parent folders.

    A numpy array is written as is when uint8 / uint16 (2-D) or uint8 RGB, otherwise windowed with
    :func:`to_uint8`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(img, np.ndarray):
        a = img
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        if not ((a.dtype == np.uint8 and a.ndim in (2, 3)) or (a.dtype == np.uint16 and a.ndim == 2)):
            a = _rgb(a) if a.ndim == 3 else to_uint8(a)
        img = Image.fromarray(a)
    with staging.staged_file(path) as tmp:
        with open(tmp, "xb") as fh:
            img.save(fh, format="PNG")
    return path


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}"
    return f"{v:.2e}"


def line_plot(
    series: dict[str, Sequence[float]],
    path: str | Path,
    title: str = "",
    size: tuple[int, int] = (480, 300),
) -> Path:
    """A small line plot written atomically to ``path`` (PNG) and returned.

    Each series is drawn over the full width (point ``i`` of ``n`` at ``x = i / (n - 1)``), so series
    recorded at different rates (a loss every step, a validation value every epoch) line up. The y axis
    spans the finite values of all series (non-finite values are skipped, breaking the line). Colours
    follow :data:`PALETTE` in the order of ``series``; a legend above the plot area names them; the y
    range is printed on the left.
    """
    w, h = int(size[0]), int(size[1])
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    vals = [float(v) for s in series.values() for v in s if v is not None and math.isfinite(float(v))]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    ml, mr, mt, mb = 56, 12, 22, 18  # plot area margins
    x0, y0, x1, y1 = ml, mt, w - mr, h - mb
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    title = title[:60]
    if title:
        draw.text((ml, 4), title, fill=(0, 0, 0), font=_font())
    lx = max(ml + _text_size(draw, title)[0] + 16, w // 2)  # legend: in the top margin, right of the title
    draw.text((4, y0), _fmt(hi), fill=(0, 0, 0), font=_font())
    draw.text((4, y1 - 10), _fmt(lo), fill=(0, 0, 0), font=_font())
    for k, (name, s) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        n = len(s)
        pts: list[tuple[float, float]] = []
        for i, v in enumerate(s):
            ok = v is not None and math.isfinite(float(v))
            if ok:
                fx = i / (n - 1) if n > 1 else 0.5
                fy = (float(v) - lo) / (hi - lo)
                pts.append((x0 + 3 + fx * (x1 - x0 - 6), y1 - 3 - fy * (y1 - y0 - 6)))
            if (not ok or i == n - 1) and pts:
                if len(pts) == 1:
                    px, py = pts[0]
                    draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=colour)
                else:
                    draw.line(pts, fill=colour, width=2)
                pts = []
        label = str(name)[:16]
        draw.line([(lx, 10), (lx + 14, 10)], fill=colour, width=2)
        draw.text((lx + 18, 4), label, fill=(0, 0, 0), font=_font())
        lx += 18 + _text_size(draw, label)[0] + 12
    return save_png(img, path)
