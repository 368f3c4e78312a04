"""Synthetic sagittal CT slices of the spine with graded vertebral compression fractures (demo kind ``vertebra``).

Layout written by :func:`make_vertebra` (an image folder with a ``labels.csv``)::

    out/labels.csv                 file,fracture,grade
    out/images/vert_00000.png      16-bit greyscale PNG, pixel = HU + 1024 (clipped to 0..4095)

``fracture`` is 1 when the centre vertebra has Genant grade >= 1 (clinical "any fracture") and is given for
every image; ``grade`` (0-3) is filled for a subset only (``graded_fraction`` of the rows plus the first
``always_graded``), as in Atad et al. where few fractures carry a Genant grade. A consumer that wants the
paper's "G2-G3 positive" rule derives it from ``grade``.

Geometry (millimetres, then rasterised): a 72 x 72 mm field of view (0.75 mm pixels at the default 96 x 96)
centred on a vertebral body, anterior to the left, superior up. Five vertebral bodies (the centre one and
two neighbours above and below, the outer ones cut by the border) separated by intervertebral discs; each
body has a cortical rim (a smooth-min distance to its four walls below ``cortex_mm``), trabecular bone with
vertical striations, a slight anterior waist; behind the bodies the spinal canal and a spinous process /
lamina per level; soft tissue with fat planes around. The column is tilted by a random angle.

Fracture model (centre vertebra only). With ``t`` in [0, 1] from the anterior to the posterior wall,
``h0(t) = H - 1.2 sin(pi t)`` mm the normal height (endplates slightly concave) and ``L`` the height loss,
the endplates move inward by ``d(t) = L w(t) h0(t)`` in total (split between the upper and the lower one):

- wedge:     ``w(t) = min(1, (1 - t) / 0.85)``            (anterior collapse; posterior wall intact)
- biconcave: ``w(t) = min(1, sin(pi t) / sin(0.4 pi))``  (central collapse of both endplates)
- crush:     ``w(t) = 1``                                 (whole body)

so the anterior (t = 0.1), middle (t = 0.5) and posterior (t = 0.9) heights are ``h0(t) (1 - L w(t))``
and the reported height loss ``1 - min_t h(t) / h0(t)`` over these three points equals ``L`` (``w`` is 1
at one of them for every shape). ``h0`` is the height the vertebra had before the fracture, which is also
its neighbours' height up to a 2 % variation. The Genant grade follows from the loss: G0 < 20 %,
G1 20-25 %, G2 25-40 %, G3 > 40 %. Grades are drawn first and the loss inside the grade's band, away from
the band edges (G0 0-12 %, G1 21-24 %, G2 27-38 %, G3 43-58 %); normal (G0) vertebrae get a mild
deformity of the same kinds, as real ones do.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from medcfx.demo.common import (
    case_rng,
    check_cases,
    check_fraction,
    check_probs,
    exact_subset,
    gauss_blur1d,
    gauss_blur2d,
    set_rng,
    smooth_noise2d,
    staging_dir,
    write_csv,
)
from medcfx.errors import UsageError

FOV_MM = 72.0
DEFORMITIES = ("wedge", "biconcave", "crush")
GRADE_BANDS = {0: (0.0, 0.12), 1: (0.21, 0.24), 2: (0.27, 0.38), 3: (0.43, 0.58)}
DEFAULT_GRADE_PROBS = (0.80, 0.06, 0.09, 0.05)
HU_OFFSET = 1024
_CONCAVITY_MM = 0.6
_POINTS = ("anterior", "middle", "posterior")  # measured at t = 0.1, 0.5, 0.9


def genant_grade(height_loss: float) -> int:
    """Genant semi-quantitative grade from the relative height loss: <20 % G0, 20-25 % G1, 25-40 % G2, >40 % G3."""
    if height_loss < 0.20:
        return 0
    if height_loss < 0.25:
        return 1
    if height_loss <= 0.40:
        return 2
    return 3


def deformity_weight(shape: str, t: np.ndarray) -> np.ndarray:
    """The endplate displacement profile ``w(t)`` (0..1) of a deformity along the anterior-posterior axis."""
    t = np.asarray(t, dtype=np.float64)
    if shape == "wedge":
        return np.minimum(1.0, np.clip(1.0 - t, 0.0, None) / 0.85)
    if shape == "biconcave":
        return np.minimum(1.0, np.clip(np.sin(np.pi * np.clip(t, 0, 1)), 0, None) / math.sin(0.4 * math.pi))
    if shape == "crush":
        return np.ones_like(t)
    raise UsageError(f"unknown deformity {shape!r}; choose one of: {', '.join(DEFORMITIES)}")


def _softmin(ds: list[np.ndarray], k: float) -> np.ndarray:
    """Smooth minimum ``-k log sum exp(-d / k)``: a signed distance with corners rounded by about ``k``."""
    m = np.minimum.reduce(ds)
    return m - k * np.log(sum(np.exp(-(d - m) / k) for d in ds))


def _aniso_noise(rng: np.random.Generator, shape, sig_rows: float, sig_cols: float) -> np.ndarray:
    """Unit-variance noise blurred by ``sig_rows`` pixels vertically and ``sig_cols`` horizontally."""
    n = rng.standard_normal(shape).astype(np.float32)
    a = _blur_axis(_blur_axis(n, sig_cols, 1), sig_rows, 0)
    return (a - a.mean()) / (a.std() + 1e-8)


def _blur_axis(img: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Gaussian blur along one axis (:func:`~medcfx.demo.common.gauss_blur1d`), float32; unchanged for sigma <= 0."""
    return img if sigma <= 0 else gauss_blur1d(img, sigma, axis).astype(np.float32)


def vertebra_image(
    rng: np.random.Generator,
    grade: int = 0,
    size: int = 96,
    deformity: str | None = None,
    tilt_deg: float | None = None,
) -> tuple[np.ndarray, dict]:
    """One sagittal slice: returns (uint16 image = HU + 1024, params).

    ``params``: grade, deformity, height_loss, heights_mm and reference_heights_mm (anterior / middle /
    posterior, at t = 0.1 / 0.5 / 0.9, after and before the fracture), width_mm (AP depth of the centre
    body), centre_px (column x, row y of the body centre before the fracture), axis_deg (rotation of the
    column frame: local ``a = cos u + sin v``, ``y = -sin u + cos v`` about centre_px, u right, v down),
    mm_per_px, top_share (share of the collapse taken by the upper endplate), centre_mask (bool pixels of
    the centre body).
    """
    if grade not in GRADE_BANDS:
        raise UsageError(f"grade must be 0, 1, 2 or 3, got {grade!r}")
    ss = 3  # supersampling
    n = size * ss
    mm = FOV_MM / size
    # pixel centres in mm: u to the right (posterior), v down (inferior), origin at the image centre
    c = (np.arange(n) + 0.5) * (FOV_MM / n) - FOV_MM / 2
    v, u = np.meshgrid(c, c, indexing="ij")
    theta = math.radians(rng.uniform(-10, 10) if tilt_deg is None else tilt_deg)
    shift = rng.uniform(-2.0, 2.0, 2)
    # local column frame: a along the AP axis (anterior negative), y along the column (inferior positive)
    du, dv = u - shift[0], v - shift[1]
    a = math.cos(theta) * du + math.sin(theta) * dv
    y = -math.sin(theta) * du + math.cos(theta) * dv

    W = rng.uniform(27, 36)
    H = rng.uniform(20, 26)
    disc = rng.uniform(6.5, 10)
    if grade == 0:
        loss_target = rng.uniform(*GRADE_BANDS[0])
        shape = deformity or str(rng.choice(DEFORMITIES, p=[0.5, 0.3, 0.2]))
    else:
        loss_target = rng.uniform(*GRADE_BANDS[grade])
        shape = deformity or str(rng.choice(DEFORMITIES, p=[0.5, 0.3, 0.2]))
    # heights at the three Genant points, and the resulting loss (the label is computed, not assumed);
    # the normal height includes the physiological endplate concavity (0.6 mm per endplate at mid-body)
    tpts = np.array([0.1, 0.5, 0.9])
    ref_heights = H - 2 * _CONCAVITY_MM * np.sin(np.pi * tpts)
    heights = ref_heights * (1 - loss_target * deformity_weight(shape, tpts))
    loss = float(1 - (heights / ref_heights).min())
    g = genant_grade(loss)
    top_share = {"wedge": 0.7, "biconcave": 0.5, "crush": 0.6}[shape]

    trab_hu = rng.uniform(190, 280)
    cortex_hu = rng.uniform(550, 850)
    cortex_mm = rng.uniform(0.9, 1.4)
    disc_hu = rng.uniform(70, 100)
    curv = rng.uniform(-0.25, 0.25)  # mm of AP offset per level^2 (lordosis/kyphosis)

    # ---- soft tissue background with fat planes
    hu = 40 + 10 * smooth_noise2d(rng, (n, n), 6 * ss)
    fat = np.clip((smooth_noise2d(rng, (n, n), 4 * ss) - 1.0) / 0.5, 0, 1)
    hu = hu * (1 - fat) + (-80) * fat

    # ---- levels: k = -2..2 (k = 0 is the centre vertebra)
    levels = []
    y_top0 = -H / 2
    y_bot0 = H / 2
    for k in (-2, -1, 0, 1, 2):
        Hk = H * rng.uniform(0.98, 1.02) if k else H
        Wk = W * rng.uniform(0.95, 1.05) if k else W
        levels.append({"k": k, "H": Hk, "W": Wk, "off": curv * k * k + (0.0 if k == 0 else rng.uniform(-0.7, 0.7))})
    # vertical placement: the centre body spans [-H/2, H/2]; neighbours stacked with discs between them
    by = {0: (y_top0, y_bot0)}
    for k in (-1, -2):
        bot = by[k + 1][0] - disc * rng.uniform(0.9, 1.1)
        by[k] = (bot - levels[k + 2]["H"], bot)
    for k in (1, 2):
        top = by[k - 1][1] + disc * rng.uniform(0.9, 1.1)
        by[k] = (top, top + levels[k + 2]["H"])
    # a fracture shortens the column: the levels above slide down by part of the centre's top displacement
    mean_top = top_share * loss_target * H * float(deformity_weight(shape, np.linspace(0, 1, 21)).mean())
    for k in (-1, -2):
        by[k] = (by[k][0] + 0.5 * mean_top, by[k][1] + 0.5 * mean_top)

    def walls(lv, ytop, ybot):
        """Anterior/posterior wall positions and endplate curves of one body, as functions on the grid."""
        ant = -lv["W"] / 2 + lv["off"]
        post = lv["W"] / 2 + lv["off"]
        t = (a - ant) / (post - ant)
        mid = (ytop + ybot) / 2
        half = (ybot - ytop) / 2
        waist = 1.0 * (1 - np.clip(((y - mid) / half) ** 2, 0, 1))  # anterior concavity
        top = ytop + _CONCAVITY_MM * np.sin(np.pi * np.clip(t, 0, 1))  # physiological endplate concavity
        bot = ybot - _CONCAVITY_MM * np.sin(np.pi * np.clip(t, 0, 1))
        if lv["k"] == 0 and loss_target > 0:
            collapse = loss_target * deformity_weight(shape, t) * (bot - top)
            top = top + top_share * collapse
            bot = bot - (1 - top_share) * collapse
        return ant + waist, post, top, bot, t

    # ---- spinal canal and posterior elements (behind the bodies)
    canal_w = rng.uniform(11, 14)
    post_wall = W / 2 + np.array([lv["off"] for lv in levels]).mean()
    canal = (a > post_wall + 1.0) & (a < post_wall + 1.0 + canal_w)
    hu = np.where(canal, 25 + 6 * smooth_noise2d(rng, (n, n), 3 * ss), hu)
    for lv in levels:
        ytop, ybot = by[lv["k"]]
        cy = (ytop + ybot) / 2 + 3.0
        cx = post_wall + 1.0 + canal_w + 6.0
        ang = math.radians(rng.uniform(15, 35))  # spinous process points down and back
        ea = (a - cx) * math.cos(ang) + (y - cy) * math.sin(ang)
        eb = -(a - cx) * math.sin(ang) + (y - cy) * math.cos(ang)
        r = (ea / rng.uniform(9, 12)) ** 2 + (eb / rng.uniform(4.0, 5.5)) ** 2
        proc = r < 1
        rim = proc & (r > 0.55)
        hu = np.where(proc, 280 + 40 * smooth_noise2d(rng, (n, n), 1.5 * ss), hu)
        hu = np.where(rim, cortex_hu * 0.8, hu)
        # lamina: a short bony bar closing the canal behind, at mid height
        lam = (np.abs(y - cy + 3) < 3.0) & (a > post_wall + canal_w - 1) & (a < post_wall + canal_w + 3)
        hu = np.where(lam, cortex_hu * 0.7, hu)

    # ---- discs then bodies
    bodies = {}
    for lv in levels:
        bodies[lv["k"]] = walls(lv, *by[lv["k"]])
    for k in (-2, -1, 0, 1):
        ant1, post1, _, bot1, _ = bodies[k]
        ant2, post2, top2, _, _ = bodies[k + 1]
        ant = np.minimum(ant1, ant2) - 0.8
        post = np.maximum(post1, post2) + 0.5
        dsc = (y > bot1 - 0.5) & (y < top2 + 0.5) & (a > ant) & (a < post)
        hu = np.where(dsc, disc_hu + 8 * smooth_noise2d(rng, (n, n), 2 * ss), hu)
    texture = _aniso_noise(rng, (n, n), 1.0 * ss / mm, 0.35 * ss / mm)
    speck = np.clip(smooth_noise2d(rng, (n, n), 0.6 * ss) - 1.5, 0, None)
    centre_mask = None
    for lv in levels:
        ant, post, top, bot, t = bodies[lv["k"]]
        dist = _softmin([a - ant, post - a, y - top, bot - y], 0.8)
        inside = dist > 0
        cortical = inside & (dist < cortex_mm)
        body = trab_hu * rng.uniform(0.95, 1.05) + 25 * texture - 40 * speck
        if lv["k"] == 0 and loss_target > 0.15:
            # sclerosis: the compressed trabeculae near the collapsed endplate are denser
            near = np.clip(1 - (y - top) / 3.0, 0, 1) * np.clip((dist > 0), 0, 1) * deformity_weight(shape, t)
            body = body + 120 * loss_target * near
        hu = np.where(inside, body, hu)
        hu = np.where(cortical, cortex_hu + 40 * texture, hu)
        if lv["k"] == 0:
            centre_mask = inside

    # ---- to the pixel grid: box-average the supersamples, slight blur, CT noise
    img = hu.reshape(size, ss, size, ss).mean(axis=(1, 3))
    img = gauss_blur2d(img, 0.35)
    img = img + rng.normal(0, rng.uniform(8, 18), img.shape)
    out = np.clip(np.round(img + HU_OFFSET), 0, 4095).astype(np.uint16)
    mask = centre_mask.reshape(size, ss, size, ss).mean(axis=(1, 3)) > 0.5
    centre_px = (size / 2 + shift[0] / mm - 0.5, size / 2 + shift[1] / mm - 0.5)
    params = {
        "grade": g,
        "deformity": shape,
        "height_loss": round(loss, 4),
        "reference_heights_mm": {k: round(float(h), 3) for k, h in zip(_POINTS, ref_heights)},
        "heights_mm": {k: round(float(h), 3) for k, h in zip(_POINTS, heights)},
        "width_mm": round(float(W), 3),
        "centre_px": [round(float(x), 3) for x in centre_px],
        "axis_deg": round(math.degrees(theta), 3),
        "mm_per_px": mm,
        "top_share": top_share,
        "centre_mask": mask,
    }
    return out, params


def make_vertebra(
    out: str | Path,
    cases: int | None = None,
    seed: int = 0,
    *,
    size: int = 96,
    graded_fraction: float = 0.3,
    always_graded: int = 8,
    grade_probs: tuple[float, float, float, float] = DEFAULT_GRADE_PROBS,
    overwrite: bool = False,
) -> Path:
    """Write ``cases`` (default 400) slices and ``labels.csv`` into ``out``; returns ``out``.

    ``grade_probs``: probabilities of G0..G3 (default 0.80, 0.06, 0.09, 0.05: imbalanced, most normal).
    ``graded_fraction``: share of rows whose ``grade`` cell is filled (``round(f * cases)`` rows chosen at
    random, plus the first ``always_graded`` rows). ``fracture`` (grade >= 1) is filled for every row.
    """
    n = check_cases(cases, 400)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 32 <= size <= 1024:
        raise UsageError(f"option size must be an integer in 32..1024, got {size!r}")
    probs = check_probs("grade_probs", grade_probs, 4)
    frac = check_fraction("graded_fraction", graded_fraction)
    if not isinstance(always_graded, (int, np.integer)) or always_graded < 0:
        raise UsageError(f"option always_graded must be a non-negative integer, got {always_graded!r}")
    rng = set_rng("vertebra", seed)
    graded = exact_subset(rng, n, frac)
    graded[: int(always_graded)] = True
    grades = rng.choice(4, size=n, p=probs)
    rows = []
    with staging_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        for i in range(n):
            img, params = vertebra_image(case_rng("vertebra", seed, i), int(grades[i]), int(size))
            name = f"images/vert_{i:05d}.png"
            Image.fromarray(img).save(tmp / name)
            g = params["grade"]
            rows.append([name, int(g >= 1), g if graded[i] else None])
        write_csv(tmp / "labels.csv", ["file", "fracture", "grade"], rows)
    return Path(out)
