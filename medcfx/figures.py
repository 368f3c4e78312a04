"""Figures drawn with matplotlib: the explain panels of a case, the training progress plot, the tile layout.

Every figure is a ``matplotlib.figure.Figure`` on its own Agg canvas (``FigureCanvasAgg``), never pyplot:
no display is opened, no backend is selected globally, no figure is kept in a global list (nothing to
close; a figure is freed with its last reference). :func:`save` renders one and writes it atomically
through :func:`medcfx.viz.save_png`. Layouts are placed in pixels (:func:`tile_figure`), so a tile shows
its image at a whole multiple of the image's own pixel size (nearest neighbour), never smaller.

Explain panels (:class:`CasePanels`, one PNG per explained slice, ``panels/slice_KKK.png``)

- Every tile is on the input's own grid: model-sized slices are brought back by
  :meth:`~medcfx.inputs.InputCase.to_original` (so the input and counterfactual tiles show what the model
  saw, at the model's resolution, on the input's pixels); the map, the decision mask and the annotation
  are the native ones that explain writes as NIfTI.
- Orientation: volume slices are shown in the radiological convention, read from the case's canonical
  RAS+ orientation with :mod:`nibabel.orientations` (:func:`display_ornt`): axial slices with anterior up
  and the patient's right on the viewer's left (coronal: superior up, right on the left; sagittal:
  superior up, anterior on the left). Letters at the input tile's edges name the sides. A 2D image is
  shown as stored.
- Colour: the map uses one fixed range per kind of map (:class:`MapScale`, chosen by the method and
  stated in the colour bar's label), the same for every slice and every case; values above the range
  saturate (the colour bar then has an arrow). The map is drawn only inside the scored region (the brain
  for a skull-stripped volume; all of a 2D image); outside it the input shows through. A calibrated
  threshold is marked on the colour bar and the decision mask is outlined on the map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

DPI = 100
MIN_TILE = 160  # smallest tile side in pixels: small images are enlarged by a whole factor up to this
GAP = 8  # pixels between tiles
MARGIN = 8
ROW_TITLE = 18  # pixels above each tile for its title
HEAT_CMAP = "inferno"  # perceptually uniform, dark (0) to pale yellow (top); close to medcfx.viz.heat_rgb
DECISION_COLOUR = "#39ff14"  # the operating point's mask outline
ANNOTATION_COLOUR = "#00e5ff"  # the annotated lesion mask's outline

# the display axes (row code, column code, slice code) per canonical slicing axis, as nibabel axis codes
# (each code names the direction in which the index increases): rows run towards P (anterior at the top),
# columns towards L (the patient's right on the viewer's left)
DISPLAY_CODES = {2: ("P", "L", "S"), 1: ("I", "L", "A"), 0: ("I", "P", "R")}
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
_PLANE = {2: "axial", 1: "coronal", 0: "sagittal"}


# ---------------------------------------------------------------------------------------------- basics


def figure(width_px: int, height_px: int):
    """A blank white figure of exactly ``width_px`` x ``height_px`` pixels on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def render(fig) -> np.ndarray:
    """The figure's pixels: uint8 [H, W, 3]."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save(fig, path: str | Path) -> Path:
    """Render ``fig`` and write it as a PNG atomically (:func:`medcfx.viz.save_png`); returns the path."""
    from medcfx.viz import save_png

    return save_png(render(fig), path)


def tile_factor(shape: Sequence[int], min_side: int = MIN_TILE) -> int:
    """The whole enlargement that brings an image's longer side to at least ``min_side`` (1 when it is)."""
    return max(1, math.ceil(min_side / max(int(shape[0]), int(shape[1]))))


def enlarge(img: np.ndarray, f: int) -> np.ndarray:
    """Nearest-neighbour enlargement of the first two axes by the whole factor ``f``."""
    return img if f == 1 else np.repeat(np.repeat(img, f, axis=0), f, axis=1)


def grey(img: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """A 2-D image windowed to [lo, hi] as float RGB [H, W, 3] in [0, 1] (non-finite values black)."""
    a = np.asarray(img, dtype=np.float32)
    g = np.clip((np.where(np.isfinite(a), a, lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.repeat(g[..., None], 3, axis=2)


def coloured(values: np.ndarray, vmin: float, vmax: float, cmap: str = HEAT_CMAP) -> np.ndarray:
    """Values through a matplotlib colormap over the fixed range [vmin, vmax]: float RGB [H, W, 3]."""
    import matplotlib

    x = np.clip((np.nan_to_num(np.asarray(values, np.float64), nan=vmin) - vmin) / (vmax - vmin), 0.0, 1.0)
    return matplotlib.colormaps[cmap](x)[..., :3]


def outline(rgb: np.ndarray, mask: np.ndarray, colour: str, width: int = 1) -> np.ndarray:
    """``rgb`` with the inner boundary (``width`` pixels) of the bool ``mask`` (same size) in ``colour``."""
    from matplotlib.colors import to_rgb
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return rgb
    edge = m & ~ndimage.binary_erosion(m, iterations=max(1, width), border_value=0)
    out = rgb.copy()
    out[edge] = to_rgb(colour)
    return out


@dataclass
class Layout:
    """A figure of tiles placed in pixels: ``origins[r][c]`` = (left, top) of each tile, from the figure's
    top left; ``tile`` = (height, width); ``bottom_top``: the top of the free band under the tiles."""

    fig: object
    origins: list
    tile: tuple[int, int]
    bottom_top: int

    def put(self, r: int, c: int, rgb: np.ndarray, title: str = "", colour: str = "black"):
        """Draw the float RGB image ``rgb`` (exactly the tile's size) in tile (r, c), its title above it."""
        x, y = self.origins[r][c]
        h = rgb.shape[0]
        H = int(round(self.fig.bbox.height))
        self.fig.figimage(np.clip(rgb, 0, 1), xo=x, yo=H - y - h, origin="upper")
        if title:
            W = self.fig.bbox.width
            self.fig.text((x + self.tile[1] / 2) / W, 1 - (y - 4) / H, title, ha="center", va="bottom",
                          fontsize=8, color=colour)

    def letters(self, r: int, c: int, sides: Sequence[str], colour: str = "yellow") -> None:
        """Letters (left, right, top, bottom) at the middle of tile (r, c)'s edges."""
        x, y = self.origins[r][c]
        th, tw = self.tile
        W, H = self.fig.bbox.width, self.fig.bbox.height
        spots = ((x + 3, y + th / 2, "left", "center"), (x + tw - 3, y + th / 2, "right", "center"),
                 (x + tw / 2, y + 3, "center", "top"), (x + tw / 2, y + th - 3, "center", "bottom"))
        for (px, py, ha, va), s in zip(spots, sides):
            self.fig.text(px / W, 1 - py / H, s, ha=ha, va=va, color=colour, fontsize=8, weight="bold")


def tile_figure(rows: int, cols: int, tile_hw: tuple[int, int], top_px: int = 40, bottom_px: int = 0,
                row_title_px: int = ROW_TITLE) -> Layout:
    """A figure of ``rows`` x ``cols`` tiles of ``tile_hw`` pixels each under a band of ``top_px`` (the
    title), with ``bottom_px`` free below (colour bar, legend); placed in pixels, no layout engine."""
    th, tw = int(tile_hw[0]), int(tile_hw[1])
    width = 2 * MARGIN + cols * tw + (cols - 1) * GAP
    height = top_px + rows * (row_title_px + th) + (rows - 1) * GAP + bottom_px + MARGIN
    fig = figure(width, height)
    origins = [[(MARGIN + c * (tw + GAP), top_px + r * (row_title_px + th + GAP) + row_title_px)
                for c in range(cols)] for r in range(rows)]
    return Layout(fig, origins, (th, tw), top_px + rows * (row_title_px + th) + (rows - 1) * GAP)


def colour_bar(fig, rect_px: tuple[int, int, int, int], vmin: float, vmax: float, label: str,
               extend: str = "neither", cmap: str = HEAT_CMAP):
    """A horizontal colour bar at ``rect_px`` = (left, top, width, height) in pixels from the figure's top
    left, labelled ``label`` below it; returns its axes."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    W, H = fig.bbox.width, fig.bbox.height
    x, y, w, h = rect_px
    cax = fig.add_axes((x / W, 1 - (y + h) / H, w / W, h / H))
    fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=cax, orientation="horizontal", extend=extend)
    cax.tick_params(labelsize=7, length=2, pad=1)
    cax.set_xlabel(label, fontsize=8, labelpad=2)
    return cax


# ---------------------------------------------------------------------------------------------- explain panels


@dataclass(frozen=True)
class MapScale:
    """How a kind of map is coloured: ``what`` the values are, the fixed range ``vmin`` .. ``vmax``."""

    what: str
    vmax: float
    vmin: float = 0.0

    def label(self, saturated: bool) -> str:
        tail = ", higher values saturate" if saturated else ""
        return f"{self.what}: fixed colour scale {self.vmin:g} to {self.vmax:g}{tail}"


def display_ornt(ornt: Sequence[Sequence[int]], axis: int) -> np.ndarray:
    """The nibabel transform from a volume's storage order (its storage -> RAS+ ``ornt``, as
    :func:`nibabel.orientations.io_orientation` gives it) to the display order of slicing axis ``axis``
    (:data:`DISPLAY_CODES`): the result is indexed [row, column, slice], the slice index counting as in
    the canonical volume."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    return ornt_transform(np.asarray(ornt, dtype=float), axcodes2ornt(DISPLAY_CODES[axis]))


class CasePanels:
    """The explain panels of one case: one figure per explained slice.

    ``images``: (title, model-sized slices [n, S, S] in [-1, 1]) shown in grey, the first being the input;
    ``heat``: the map on the input's grid (as written to NIfTI), drawn with ``scale`` inside the case's
    scored region (its foreground); ``overlay``: also a tile with the map blended over the input (weight
    rising with the value); ``decision``: the operating point's :class:`~medcfx.scoring.Decision` (its mask
    is outlined on the map tiles, its threshold marked on the colour bar). A case with an annotated lesion
    gets a last tile with the annotation outlined on the input. ``channel``, ``model``: named in the title.
    """

    def __init__(self, case, images: Sequence[tuple[str, np.ndarray]], heat: np.ndarray, scale: MapScale, *,
                 channel: str, model: str, map_title: str = "map", overlay: bool = False, decision=None):
        from nibabel.orientations import apply_orientation

        self.case, self.scale, self.channel, self.model = case, scale, channel, model
        self.map_title, self.overlay, self.decision = map_title, overlay, decision
        geom = case.result.geometry
        self.axis = None if geom.is_2d else int(geom.axis)
        transform = None if self.axis is None else display_ornt(geom.ornt, self.axis)

        def show(vol):
            if vol is None:
                return None
            return np.asarray(vol) if transform is None else apply_orientation(np.asarray(vol), transform)

        self.images = [(t, show(case.to_original(np.asarray(a, dtype=np.float32), fill=-1.0))) for t, a in images]
        heat = np.asarray(heat, dtype=np.float32)
        region = case.scored_region
        self.region = show(np.ones(heat.shape, bool) if region is None else region)
        self.heat = show(heat)
        self.mask = show(decision.mask > 0) if decision is not None else None
        lesion = case.result.lesion
        self.lesion = show(lesion > 0) if lesion is not None else None
        inside = heat[region] if region is not None and region.any() else heat
        self.saturated = bool(inside.size and float(np.nanmax(inside)) > scale.vmax)
        self.n_slices = None if self.axis is None else int(geom.canonical_shape[self.axis])

    def _slice(self, vol, k: int):
        return None if vol is None else (vol if self.axis is None else vol[:, :, k])

    def title(self, k: int) -> str:
        if self.axis is None:
            where = "2D image, as stored"
        else:
            where = f"{_PLANE[self.axis]} slice {k} (of 0-{self.n_slices - 1}), radiological view"
        return f"{self.case.id}  |  {where}  |  channel {self.channel}  |  model {self.model}"

    def figure(self, j: int):
        """The figure of the ``j``-th explained slice (its index is ``case.slice_index[j]``)."""
        k = int(self.case.slice_index[j])
        tiles = [(t, self._slice(v, k)) for t, v in self.images]
        base = tiles[0][1]
        heat, region = self._slice(self.heat, k), self._slice(self.region, k)
        mask, lesion = self._slice(self.mask, k), self._slice(self.lesion, k)
        f = tile_factor(base.shape)
        width = 2 if base.shape[0] * f >= 200 else 1  # outline width in pixels
        big = lambda a: enlarge(a, f)  # noqa: E731
        lay = tile_figure(1, len(tiles) + 1 + int(self.overlay) + int(lesion is not None),
                          (base.shape[0] * f, base.shape[1] * f), top_px=30, bottom_px=58)
        fig = lay.fig
        fig.suptitle(self.title(k), fontsize=9, y=1 - 8 / fig.bbox.height, va="top")
        back = big(grey(base))
        for c, (t, img) in enumerate(tiles):
            lay.put(0, c, big(grey(img)), t)
        if self.axis is not None:
            row, col, _ = DISPLAY_CODES[self.axis]
            lay.letters(0, 0, (_OPPOSITE[col], col, _OPPOSITE[row], row))
        c = len(tiles)
        vmin, vmax = self.scale.vmin, self.scale.vmax
        colours, inside = big(coloured(heat, vmin, vmax)), big(region)[..., None]
        shown = np.where(inside, colours, back)
        if mask is not None:
            shown = outline(shown, big(mask), DECISION_COLOUR, width)
        lay.put(0, c, shown, self.map_title + (f", outline: > {self.decision.name}" if mask is not None else ""))
        if self.overlay:
            c += 1
            alpha = 0.8 * np.clip((np.nan_to_num(heat) - vmin) / (vmax - vmin), 0, 1)
            blend = back + (colours - back) * big(np.where(region, alpha, 0.0))[..., None]
            if mask is not None:
                blend = outline(blend, big(mask), DECISION_COLOUR, width)
            lay.put(0, c, blend, "overlay")
        if lesion is not None:
            c += 1
            lay.put(0, c, outline(back, big(lesion), ANNOTATION_COLOUR, width), "annotated lesion (outline)")
        W = int(fig.bbox.width)
        cax = colour_bar(fig, (MARGIN + 4, lay.bottom_top + 8, W - 2 * MARGIN - 8, 10), vmin, vmax,
                         self.scale.label(self.saturated), extend="max" if self.saturated else "neither")
        if self.decision is not None and vmin <= self.decision.threshold <= vmax:
            cax.axvline(self.decision.threshold, color=DECISION_COLOUR, linewidth=2)
        return fig

    def write(self, folder: str | Path) -> list[Path]:
        """``folder/panels/slice_KKK.png`` for every explained slice (K: the slice index)."""
        folder = Path(folder)
        return [save(self.figure(j), folder / "panels" / f"slice_{int(k):03d}.png")
                for j, k in enumerate(self.case.slice_index)]


# ---------------------------------------------------------------------------------------------- training


def training_figure(losses: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], title: str = "",
                    size: tuple[int, int] = (640, 400)):
    """The figure of progress.png: the training loss against the step (a thin line, with its running mean
    over about 1 % of the steps once there are more than 200) and the validation loss (points) when there is
    one; x axis "step", y axis "loss", logarithmic when the positive values span more than a factor 20."""
    fig = figure(*size)
    ax = fig.add_axes((0.11, 0.12, 0.86, 0.78))
    steps = np.asarray([s for s, _ in losses], dtype=np.float64)
    vals = np.asarray([v for _, v in losses], dtype=np.float64)
    if len(vals):
        ax.plot(steps, vals, color="#1f77b4", linewidth=0.7, alpha=0.5 if len(vals) > 200 else 1.0,
                label="training loss")
        if len(vals) > 200:
            w = max(2, len(vals) // 100)
            ax.plot(steps[w - 1:], np.convolve(vals, np.ones(w) / w, mode="valid"), color="#1f77b4",
                    linewidth=1.6, label=f"training loss, mean of {w} steps")
    if len(val):
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="#ff7f0e", markersize=4, linewidth=1.2,
                label="validation loss")
    pos = np.asarray([v for _, v in [*losses, *val] if v is not None and math.isfinite(v) and v > 0])
    if pos.size and pos.max() / pos.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("loss", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if len(vals) or len(val):
        ax.legend(fontsize=8, loc="upper right")
    last = f"step {int(steps[-1])}, loss {vals[-1]:.4g}" if len(vals) else "no step yet"
    ax.set_title(f"{title}  ({last})" if title else last, fontsize=9)
    return fig


def training_plot(losses: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: str | Path,
                  title: str = "", size: tuple[int, int] = (640, 400)) -> Path:
    """Write :func:`training_figure` to ``path`` (PNG, atomically); about 0.04 s for 5,000 steps, 0.1 s for
    50,000 (measured on 2 CPU cores)."""
    return save(training_figure(losses, val, title, size), path)
