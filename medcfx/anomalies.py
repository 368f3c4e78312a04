"""Synthetic anomalies: five self-supervised corruption tasks for healthy images (numpy and scipy).

The tasks of Baugh et al. 2023 ("Many tasks make light work"), which the restoration method (Baugh et al.
2024) uses to corrupt healthy training images; numbering and fold order follow the authors' code:

    0 ``intra_blend``  a patch of ANOTHER IMAGE OF THE SAME DATASET, rotated and scaled, blended in the
                       gradient domain (Poisson image editing: mixed or source gradients)
    1 ``inter_blend``  the same with a patch from ANOTHER DATASET OR MODALITY
    2 ``sink``         radial deformation pulling the content of a shape towards its centre
    3 ``source``       radial deformation pushing the content of a shape away from its centre
    4 ``intensity``    smooth intensity change: a signed magnitude times fractal noise, with a ramp at the
                       edge of the shape

Images are float arrays ``[C, H, W]`` (any range; the intensity magnitudes are fractions of
``AnomalyConfig.value_range``, medcfx's model range [-1, 1] by default). Every anomaly lives in a randomly
deformed blob placed ENTIRELY inside the image's foreground (pixels where some channel exceeds that
channel's minimum: the background of skull-stripped MRI is excluded) and at least one pixel away from the
image border. 1 to 4 anomalies per image: after each one, another follows with probability
``continue_prob`` (0.5: 1, 2, 3, 4 anomalies with probabilities 1/2, 1/4, 1/8, 1/8). All anomalies of one
call use the same task.

Contract of :func:`synthesize` (checked by the tests): pixels outside the union of the placed shapes are
bit-for-bit the input's; the returned ``mask`` is exactly the set of pixels whose value changed in some
channel (so ``mask == np.any(image != out, axis=0)``, and ``mask`` lies inside the shapes); a seed
reproduces the same anomaly.

Shapes. A blob is star-shaped around its centre pixel c: a pixel at offset d = (dy, dx) from c is inside
when ``|d| < R(theta)``, ``theta = atan2(dy, dx)``, with ``R(theta) = E(theta - alpha) * (1 + sum_k a_k
cos(k theta + phi_k))`` (k = 2, 3, 4; |a_k| <= 0.1), E the radius of an ellipse with semi-axes h/2, w/2 at
angle alpha. The side lengths follow the authors' code: per axis, ``clip((0.03 + Gamma(2, 0.1)) * extent,
0.06 * extent, 0.8 * extent)`` with ``extent`` the foreground's bounding-box side on that axis.

Deformations (sink / source). Along every ray from c, a pixel at radius r (edge radius D = R(theta),
x = r / D) takes the value found at radius D * phi(x) on the same ray (bilinear interpolation):
``phi(x) = x^k`` for ``source`` (content pushed outwards) and ``phi(x) = 1 - (1 - x)^k`` for ``sink``
(pulled inwards), k > 1. Both fix the centre and the edge, so the image is continuous across the shape's
border and untouched outside it. The largest displacement ``max_x |phi(x) - x| * D_mean = (1 - 1/k)
k^(-1/(k-1)) * D_mean`` equals a push distance p drawn uniformly from ``[max(min_push, 0.1 M),
min(max_push, 0.9 M)]`` px, ``M = D_mean / sqrt(2)`` (the authors' bounds; p = 0.5-5 px by default), with
D_mean the mean edge radius; k is found by bisection. Along a ray the largest displacement is
(p / D_mean) * D(theta), so elongated shapes move more along their long axis (as in the authors' code).

Intensity change. ``out = clip(x + s_c * m * ramp * noise, min_c, max_c)`` inside the shape: magnitude
``m = (scale / 2 + Gamma(3, scale)) * (range width)`` (scale 0.1: 0.05 + Gamma(3, 0.1) of the range), a
random sign s_c per channel, ``noise`` fractal value noise over the shape's box rescaled to [0, 1], and
``ramp = min(1, dist / L)`` with dist the Euclidean distance to the nearest pixel outside the shape and
``L = min(min(H, W) * (0.02 + Gamma(3, 0.01)), max dist)``; min_c / max_c are the channel's extremes in
the input image.

Blending. The source patch g is the source image sampled (bilinear, edge-clamped) at
``c_src + Rot(beta) (p - c) / s`` for every destination pixel p, with c_src a random foreground pixel of the
source, beta uniform in [0, 2 pi) and s = 2^U(-0.5, 0.5). Inside the shape Omega the result f solves the
discrete Poisson equation with the input x as Dirichlet boundary (Perez et al. 2003):

    for p in Omega:  sum_{q in N4(p)} (f_p - f_q) = sum_{q in N4(p)} v_pq,   f_q = x_q for q outside Omega

with the guidance field ``v_pq = g_p - g_q`` ("source" gradients: the Laplacian of f equals that of g inside
Omega) or, per edge and channel, whichever of ``g_p - g_q`` and ``x_p - x_q`` is larger in magnitude
("mixed" gradients, the authors' default). The sparse symmetric positive definite system is solved directly
(one scipy.sparse LU factorisation for all channels, :func:`poisson_blend`); the result is clipped to the
channel extremes of the input as in the authors' code.

Cross-validation over tasks (:func:`fold_tasks`): fold k trains on ``itertools.combinations(range(5),
3)[k]`` and validates on the other two tasks, 10 folds; each task is held out in exactly 4 of them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu

from medcfx.errors import UsageError

__all__ = [
    "TASKS",
    "NUM_FOLDS",
    "AnomalyConfig",
    "Synthetic",
    "fold_tasks",
    "foreground",
    "synthesize",
    "poisson_blend",
    "distance_inside",
    "fractal_noise",
    "bilinear",
    "example_grid",
    "invert_contrast",
]

TASKS = ("intra_blend", "inter_blend", "sink", "source", "intensity")
TRAIN_TASKS_PER_FOLD = 3
NUM_FOLDS = math.comb(len(TASKS), TRAIN_TASKS_PER_FOLD)  # 10


def fold_tasks(fold: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training tasks, validation tasks) of cross-validation fold ``fold`` in 0..9.

    Training tasks are ``itertools.combinations(range(5), 3)[fold]`` (lexicographic, as in the authors'
    code), validation tasks the remaining two, both in task-number order.
    """
    combos = list(itertools.combinations(range(len(TASKS)), TRAIN_TASKS_PER_FOLD))
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < len(combos):
        raise UsageError(f"fold must be an integer in 0..{len(combos) - 1}, got {fold!r}")
    train = combos[int(fold)]
    return tuple(TASKS[i] for i in train), tuple(TASKS[i] for i in range(len(TASKS)) if i not in train)


@dataclass(frozen=True)
class AnomalyConfig:
    """Parameters of the tasks (defaults: the authors' code, see the module docstring)."""

    size_offset: float = 0.03  # shape side = (size_offset + Gamma(size_shape, size_scale)) * extent
    size_shape: float = 2.0
    size_scale: float = 0.1
    min_size: float = 0.06  # ... clipped to [min_size, max_size] * extent
    max_size: float = 0.8
    continue_prob: float = 0.5  # after each anomaly another one with this probability (at most max_anomalies)
    max_anomalies: int = 4
    min_push: float = 0.5  # deformation push distance, pixels
    max_push: float = 5.0
    intensity_scale: float = 0.1  # magnitude = (scale / 2 + Gamma(3, scale)) * range width
    blend: str = "mixed"  # "mixed" or "source" gradients
    patch_log2_scale: float = 0.5  # patch scale s = 2^U(-v, v)
    value_range: tuple = (-1.0, 1.0)  # the images' nominal range (intensity magnitudes are fractions of it)
    placement_tries: int = 30  # random centres tried per size before the size shrinks by 0.75

    def __post_init__(self):
        lo, hi = (float(v) for v in self.value_range)
        object.__setattr__(self, "value_range", (lo, hi))
        if not hi > lo:
            raise UsageError(f"anomalies value_range must be [low, high] with high > low, got {list(self.value_range)}")
        if self.blend not in ("mixed", "source"):
            raise UsageError(f"anomalies blend must be 'mixed' or 'source', got {self.blend!r}")
        if not 0 < self.min_size <= self.max_size <= 1:
            raise UsageError("anomalies min_size / max_size must satisfy 0 < min_size <= max_size <= 1")
        if not 0 <= self.continue_prob < 1 or self.max_anomalies < 1:
            raise UsageError("anomalies continue_prob must be in [0, 1) and max_anomalies >= 1")
        if not 0 < self.min_push <= self.max_push:
            raise UsageError("anomalies min_push / max_push must satisfy 0 < min_push <= max_push")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value_range"] = list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "AnomalyConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown anomalies option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


@dataclass
class Synthetic:
    """One corrupted image: ``image`` [C, H, W], ``mask`` bool [H, W] (exactly the changed pixels),
    ``task``, ``region`` bool [H, W] (union of the placed shapes) and one dict per anomaly in ``parts``."""

    image: np.ndarray
    mask: np.ndarray
    task: str
    region: np.ndarray
    parts: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- helpers


def foreground(image: np.ndarray) -> np.ndarray:
    """Pixels where some channel exceeds that channel's minimum over the image: bool [H, W]."""
    x = np.asarray(image)
    return np.any(x > x.min(axis=(1, 2), keepdims=True), axis=0)


def bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample ``image`` [C, H, W] at float pixel coordinates (ys, xs) (any equal shapes) by bilinear
    interpolation, coordinates clamped to the image (edge values repeat). Returns float64 [C, *ys.shape]
    (``scipy.ndimage.map_coordinates`` of order 1 per channel)."""
    c, h, w = image.shape
    y = np.clip(np.asarray(ys, dtype=np.float64), 0, h - 1)
    x = np.clip(np.asarray(xs, dtype=np.float64), 0, w - 1)
    img = np.asarray(image, dtype=np.float64)
    out = np.empty((c,) + y.shape)
    for k in range(c):
        out[k] = ndimage.map_coordinates(img[k], [y, x], order=1, mode="nearest")
    return out


def distance_inside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance from each True pixel to the nearest False pixel (0 on False pixels).

    Pixels beyond the array count as False (scipy's exact Euclidean distance transform of the mask padded
    by one False pixel).
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    return ndimage.distance_transform_edt(m)[1:-1, 1:-1]


def fractal_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth fractal (multi-octave value) noise on ``shape``, rescaled to [0, 1].

    Octave i: random values on a grid of n_i intervals per axis, interpolated with the smoothstep
    3u^2 - 2u^3, amplitude 2^-i. n_0 = 1 + Exponential((n_max - 1) / 4.5) with n_max = mean side / 3;
    each further octave doubles n (times N(1, 0.1) jitter); 1 + Poisson(1) octaves, none finer than
    n_max (as in the authors' code).
    """
    h, w = (int(s) for s in shape)
    n_max = max(1.0, (h + w) / 2 / 3)
    n0 = 1 + rng.exponential(max(n_max - 1, 1e-6) / 4.5)
    octaves = [n0]
    target = 1 + rng.poisson(1)
    while len(octaves) < target and octaves[-1] * 2 <= n_max:
        octaves.append(octaves[-1] * 2 * rng.normal(1, 0.1))
    total = np.zeros((h, w))
    for i, n in enumerate(octaves):
        ny, nx = (max(1.0, n * rng.normal(1, 0.1)) for _ in range(2))
        gy, gx = int(math.ceil(ny)) + 1, int(math.ceil(nx)) + 1
        grid = rng.random((gy, gx))
        uy = np.arange(h) / max(h - 1, 1) * ny
        ux = np.arange(w) / max(w - 1, 1) * nx
        iy, ix = np.minimum(np.floor(uy).astype(int), gy - 2), np.minimum(np.floor(ux).astype(int), gx - 2)
        ty, tx = uy - iy, ux - ix
        sy, sx = (ty * ty * (3 - 2 * ty))[:, None], (tx * tx * (3 - 2 * tx))[None, :]
        g00, g01 = grid[iy][:, ix], grid[iy][:, ix + 1]
        g10, g11 = grid[iy + 1][:, ix], grid[iy + 1][:, ix + 1]
        layer = (g00 * (1 - sx) + g01 * sx) * (1 - sy) + (g10 * (1 - sx) + g11 * sx) * sy
        total += layer * 2.0 ** -i
    total -= total.min()
    top = total.max()
    return total / top if top > 0 else np.ones((h, w))


# ------------------------------------------------------------------------------------------------- shapes


@dataclass
class _Blob:
    """A star-shaped blob around its centre: edge radius R(theta); ``mask`` over the box ``top, left``."""

    semi: tuple[float, float]
    alpha: float
    harmonics: np.ndarray  # [3, 2]: amplitude, phase for k = 2, 3, 4

    def radius(self, theta: np.ndarray) -> np.ndarray:
        a, b = self.semi  # along y, along x (before rotation by alpha)
        t = np.asarray(theta) - self.alpha
        ellipse = a * b / np.sqrt((b * np.sin(t)) ** 2 + (a * np.cos(t)) ** 2)
        mod = 1.0 + sum(amp * np.cos(k * np.asarray(theta) + ph) for k, (amp, ph) in zip((2, 3, 4), self.harmonics))
        return ellipse * mod

    def max_radius(self) -> float:
        return float(self.radius(np.linspace(0, 2 * np.pi, 361)).max())

    def offsets(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Integer offsets (dy, dx) of the pixels inside, relative to the centre, and the box half-size."""
        r = int(math.ceil(self.max_radius())) + 1
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        inside = np.hypot(dy, dx) < self.radius(np.arctan2(dy, dx))
        inside[r, r] = True
        return dy[inside], dx[inside], r


def _sample_blob(rng: np.random.Generator, extent: np.ndarray, cfg: AnomalyConfig) -> _Blob:
    sides = []
    for e in extent:
        s = (cfg.size_offset + rng.gamma(cfg.size_shape, cfg.size_scale)) * e
        sides.append(float(np.clip(s, cfg.min_size * e, cfg.max_size * e)))
    harm = np.stack([rng.uniform(-0.1, 0.1, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)
    return _Blob(semi=(max(sides[0], 2.0) / 2, max(sides[1], 2.0) / 2), alpha=float(rng.uniform(0, np.pi)),
                 harmonics=harm)


def _place(rng: np.random.Generator, fg: np.ndarray, blob: _Blob, cfg: AnomalyConfig):
    """A centre c such that every pixel of the blob lies in ``fg`` and >= 1 px from the border, shrinking
    the blob by 0.75 after ``placement_tries`` failed centres. Returns (blob, cy, cx, ys, xs) or None."""
    h, w = fg.shape
    cand = np.argwhere(fg)
    if len(cand) == 0:
        return None
    while min(blob.semi) >= 1.0:
        dy, dx, _ = blob.offsets()
        for _ in range(cfg.placement_tries):
            cy, cx = cand[rng.integers(len(cand))]
            ys, xs = cy + dy, cx + dx
            if ys.min() < 1 or xs.min() < 1 or ys.max() > h - 2 or xs.max() > w - 2:
                continue
            if fg[ys, xs].all():
                return blob, int(cy), int(cx), ys, xs
        blob = _Blob((blob.semi[0] * 0.75, blob.semi[1] * 0.75), blob.alpha, blob.harmonics)
    return None


# ------------------------------------------------------------------------------------------------ blending


def _guidance_divergence(dst: np.ndarray, src: np.ndarray, ys: np.ndarray, xs: np.ndarray, mode: str) -> np.ndarray:
    """sum_{q in N4(p)} v_pq for the pixels p = (ys, xs): [C, n]."""
    out = np.zeros((dst.shape[0], len(ys)), dtype=np.float64)
    for dy, dx in _N4:
        qy, qx = ys + dy, xs + dx
        vg = src[:, ys, xs] - src[:, qy, qx]
        if mode == "mixed":
            vf = dst[:, ys, xs] - dst[:, qy, qx]
            vg = np.where(np.abs(vg) > np.abs(vf), vg, vf)
        out += vg
    return out


_N4 = ((-1, 0), (1, 0), (0, -1), (0, 1))


def poisson_blend(dst: np.ndarray, src: np.ndarray, region: np.ndarray, mode: str = "source") -> np.ndarray:
    """Gradient-domain blending of ``src`` into ``dst`` inside ``region`` (see the module docstring).

    ``dst``, ``src``: [C, H, W] on the same grid; ``region``: bool [H, W], not touching the border. Solves
    ``4 f_p - sum_{q in N4(p) in region} f_q = sum_q v_pq + sum_{q in N4(p) outside region} dst_q``, one
    sparse LU factorisation (scipy.sparse.linalg.splu) for all channels. Returns float64 [C, H, W]: dst
    outside the region, f inside.
    """
    if mode not in ("mixed", "source"):
        raise UsageError(f"blend mode must be 'mixed' or 'source', got {mode!r}")
    dst = np.asarray(dst, dtype=np.float64)
    src = np.asarray(src, dtype=np.float64)
    region = np.asarray(region, dtype=bool)
    if dst.shape != src.shape or region.shape != dst.shape[1:]:
        raise UsageError(f"poisson_blend: dst {dst.shape}, src {src.shape} and region {region.shape} differ")
    if not region.any():
        return dst.copy()
    if region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any():
        raise UsageError("poisson_blend: the region must not touch the image border")
    ys, xs = np.nonzero(region)
    n = len(ys)
    index = np.full(region.shape, -1, dtype=np.int64)
    index[ys, xs] = np.arange(n)
    b = _guidance_divergence(dst, src, ys, xs, mode)  # [C, n]
    rows, cols = [np.arange(n)], [np.arange(n)]
    vals = [np.full(n, 4.0)]
    for dy, dx in _N4:
        q = index[ys + dy, xs + dx]
        inside = q >= 0
        rows.append(np.nonzero(inside)[0])
        cols.append(q[inside])
        vals.append(np.full(int(inside.sum()), -1.0))
        b[:, ~inside] += dst[:, ys[~inside] + dy, xs[~inside] + dx]  # Dirichlet boundary: dst outside
    A = sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    f = splu(A).solve(np.ascontiguousarray(b.T))  # [n, C]
    out = dst.copy()
    out[:, ys, xs] = f.T
    return out


# ------------------------------------------------------------------------------------------------- tasks


def _push_distance(rng: np.random.Generator, d_mean: float, cfg: AnomalyConfig) -> float:
    m = math.sqrt(d_mean ** 2 / 2)
    lo, hi = 0.1 * m, 0.9 * m
    if cfg.min_push >= hi:
        return hi
    if cfg.max_push <= lo:
        return lo
    return float(rng.uniform(max(lo, cfg.min_push), min(hi, cfg.max_push)))


def _exponent_for(frac: float) -> float:
    """k > 1 with (1 - 1/k) k^(-1/(k-1)) = frac (the largest |phi(x) - x| of phi = x^k), frac in (0, 1)."""

    def peak(k):
        return (1 - 1 / k) * k ** (-1 / (k - 1))

    lo, hi = 1.0 + 1e-9, 2.0
    while peak(hi) < frac:
        hi *= 2
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if peak(mid) < frac else (lo, mid)
    return math.sqrt(lo * hi)


def _deform(img, out, blob, cy, cx, ys, xs, kind, rng, cfg) -> dict:
    dy, dx = (ys - cy).astype(np.float64), (xs - cx).astype(np.float64)
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    edge = blob.radius(theta)
    d_mean = float(blob.radius(np.linspace(0, 2 * np.pi, 360, endpoint=False)).mean())
    push = _push_distance(rng, d_mean, cfg)
    k = _exponent_for(min(push / d_mean, 0.999))
    x = np.clip(r / edge, 0, 1)
    phi = x ** k if kind == "source" else 1 - (1 - x) ** k
    new_r = phi * edge
    with np.errstate(invalid="ignore", divide="ignore"):
        uy = np.where(r > 0, dy / r, 0.0)
        ux = np.where(r > 0, dx / r, 0.0)
    vals = bilinear(img, cy + new_r * uy, cx + new_r * ux)
    out[:, ys, xs] = vals
    return {"push": push, "exponent": k, "edge_mean": d_mean}


def _intensity(out, ys, xs, rng, cfg) -> dict:
    c, h, w = out.shape
    y0, x0 = ys.min(), xs.min()
    box = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
    box[ys - y0, xs - x0] = True
    dist = distance_inside(box)[ys - y0, xs - x0]
    ramp_len = min(min(h, w) * (0.02 + rng.gamma(3, 0.01)), float(dist.max()))
    ramp = np.clip(dist / ramp_len, 0, 1)
    lo, hi = cfg.value_range
    s = cfg.intensity_scale
    magnitude = (s / 2 + rng.gamma(3, s)) * (hi - lo)
    signs = rng.choice([-1.0, 1.0], size=c)
    noise = fractal_noise(box.shape, rng)[ys - y0, xs - x0]
    out[:, ys, xs] = out[:, ys, xs] + (signs * magnitude)[:, None] * (ramp * noise)[None]
    return {"magnitude": float(magnitude), "signs": signs.tolist(), "ramp": float(ramp_len)}


def _blend(out, cy, cx, ys, xs, source, rng, cfg) -> dict:
    src_fg = foreground(source)
    cand = np.argwhere(src_fg) if src_fg.any() else np.argwhere(np.ones(source.shape[1:], bool))
    sy, sx = cand[rng.integers(len(cand))]
    beta = float(rng.uniform(0, 2 * np.pi))
    scale = float(2.0 ** rng.uniform(-cfg.patch_log2_scale, cfg.patch_log2_scale))
    region = np.zeros(out.shape[1:], dtype=bool)
    region[ys, xs] = True
    # the patch on the region's box plus a 1-px rim (the guidance field needs the neighbours)
    y0, y1, x0, x1 = ys.min() - 1, ys.max() + 2, xs.min() - 1, xs.max() + 2
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    oy, ox = (py - cy) / scale, (px - cx) / scale
    cb, sb = math.cos(beta), math.sin(beta)
    patch = bilinear(source, sy + cb * oy - sb * ox, sx + sb * oy + cb * ox)
    g = out.astype(np.float64).copy()
    g[:, y0:y1, x0:x1] = patch
    blended = poisson_blend(out, g, region, cfg.blend)
    out[:, ys, xs] = blended[:, ys, xs]
    return {"source_centre": [int(sy), int(sx)], "rotation": beta, "scale": scale}


def synthesize(image: np.ndarray, task: str, seed: int | np.random.Generator, source: np.ndarray | None = None,
               config: AnomalyConfig | None = None, fg: np.ndarray | None = None) -> Synthetic:
    """Apply ``task`` (a name of :data:`TASKS`) to ``image`` [C, H, W]; see the module docstring.

    ``seed``: an int (reproducible) or a numpy Generator. ``source`` [C, H', W']: the image the blending
    tasks take their patch from (another image of the dataset, or of another dataset / modality); ignored
    by the other tasks. ``fg``: the foreground mask (default :func:`foreground`). If no shape fits in the
    foreground the image is returned unchanged (empty mask, no parts).
    """
    if task not in TASKS:
        raise UsageError(f"unknown anomaly task {task!r}; tasks: {', '.join(TASKS)}")
    cfg = config or AnomalyConfig()
    img = np.asarray(image)
    if not np.issubdtype(img.dtype, np.floating):
        img = img.astype(np.float32)
    if img.ndim != 3:
        raise UsageError(f"synthesize expects an image [C, H, W], got shape {img.shape}")
    if task.endswith("blend"):
        if source is None:
            raise UsageError(f"task {task} needs a source image to take its patch from")
        source = np.asarray(source)
        if source.ndim != 3 or source.shape[0] != img.shape[0]:
            raise UsageError(f"the source image must be [C={img.shape[0]}, H, W], got shape {source.shape}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    fgm = foreground(img) if fg is None else np.asarray(fg, dtype=bool)
    out = img.astype(np.float64).copy()
    region = np.zeros(img.shape[1:], dtype=bool)
    parts = []
    if fgm.any():
        ys_fg, xs_fg = np.nonzero(fgm)
        extent = np.array([ys_fg.max() - ys_fg.min() + 1, xs_fg.max() - xs_fg.min() + 1], dtype=np.float64)
        lo_c = img.min(axis=(1, 2), keepdims=True)
        hi_c = img.max(axis=(1, 2), keepdims=True)
        for _ in range(cfg.max_anomalies):
            placed = _place(rng, fgm, _sample_blob(rng, extent, cfg), cfg)
            if placed is not None:
                blob, cy, cx, ys, xs = placed
                if task in ("sink", "source"):
                    info = _deform(out.copy(), out, blob, cy, cx, ys, xs, task, rng, cfg)
                elif task == "intensity":
                    info = _intensity(out, ys, xs, rng, cfg)
                else:
                    info = _blend(out, cy, cx, ys, xs, source, rng, cfg)
                out[:, ys, xs] = np.clip(out[:, ys, xs], lo_c[:, :, 0], hi_c[:, :, 0])
                region[ys, xs] = True
                parts.append({"centre": [cy, cx], "pixels": int(len(ys)), **info})
            if rng.random() >= cfg.continue_prob:
                break
    result = out.astype(img.dtype)
    result[:, ~region] = img[:, ~region]  # bit-exact outside the shapes
    mask = np.any(result != img, axis=0)
    return Synthetic(image=result, mask=mask, task=task, region=region, parts=parts)


# ---------------------------------------------------------------------------------------------- pictures


def example_grid(images: Sequence[np.ndarray], path, seed: int = 0, channel: int = 0,
                 sources: Sequence[np.ndarray] | None = None, config: AnomalyConfig | None = None, scale: int = 3):
    """Write a PNG grid: per image, one row with the input and each task's result (the changed pixels
    outlined in red) and one row with |result - input| of the shown channel. Blending tasks take their patch
    from the next image of ``images`` (``intra_blend``) and from ``sources`` (``inter_blend``; default: the
    next image with inverted contrast inside its foreground). Returns the path."""
    from medcfx import viz

    images = [np.asarray(im, dtype=np.float32) for im in images]
    if len(images) < 2:
        raise UsageError("example_grid needs at least two images (blending takes a patch from another one)")
    cfg = config or AnomalyConfig()
    lo, hi = cfg.value_range
    rows, titles = [], []
    for i, img in enumerate(images):
        other = images[(i + 1) % len(images)]
        foreign = sources[i % len(sources)] if sources else invert_contrast(other, cfg.value_range)
        top = [viz.to_uint8(img[channel], lo, hi)]
        bottom = [np.zeros(img.shape[1:], dtype=np.uint8)]
        for k, task in enumerate(TASKS):
            src = other if task == "intra_blend" else foreign
            res = synthesize(img, task, np.random.default_rng([seed, i, k]), source=src, config=cfg)
            tile = np.repeat(viz.to_uint8(res.image[channel], lo, hi)[..., None], 3, axis=2)
            edge = res.mask & ~_erode(res.mask)
            tile[edge] = (255, 40, 40)
            top.append(tile)
            diff = np.abs(res.image[channel] - img[channel])
            bottom.append(viz.heat_rgb(diff, vmax=max(float(diff.max()), 1e-6)))
        rows += [top, bottom]
        titles += [["input"] + list(TASKS), ["", *("|change|" for _ in TASKS)]]
    return viz.save_png(viz.grid(rows, titles, scale=scale), path)


def invert_contrast(image: np.ndarray, value_range=(-1.0, 1.0)) -> np.ndarray:
    """``lo + hi - x`` inside the foreground, x elsewhere: a crude "other modality" of the same anatomy."""
    lo, hi = value_range
    x = np.asarray(image)
    return np.where(foreground(x)[None], lo + hi - x, x).astype(x.dtype)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the 4-neighbour cross; pixels beyond the array count as False."""
    return ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
