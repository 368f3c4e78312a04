"""Synthetic frontal chest radiographs with three findings (demo kind ``chest``).

Layout written by :func:`make_chest` (an image folder with a ``labels.csv``)::

    out/labels.csv               file,cardiomegaly,effusion,nodule,bbox_cardiomegaly,bbox_effusion,bbox_nodule,meta_ctr
    out/images/cxr_00000.png     8-bit greyscale PNG (bright = dense)

Labels are 0/1; the rows of the ``unlabelled_fraction`` have empty label, box and meta_ctr cells. A box is
``x0;y0;x1;y1`` in pixels, x along the width, ``x0, y0`` the first covered pixel and ``x1, y1`` one past
the last (Python slice convention: the finding is ``img[y0:y1, x0:x1]``). ``meta_ctr`` is the cardiothoracic
ratio measured on the drawn masks.

Image model: a radiograph is bright where the beam was attenuated. The renderer sums an attenuation map
(body soft tissue thicker in the middle; lungs subtract air; mediastinum and spine, heart, diaphragm and
abdomen, posterior ribs (curved bands), clavicles and findings add) and maps it through
``1 - exp(-k A)`` with a random exposure ``k`` and gamma, then blurs and adds noise. Per image the patient
is shifted, scaled and slightly rotated.

Findings (drawn independently with probabilities ``prevalence``):

- cardiomegaly: the cardiothoracic ratio ``CTR = heart width / thoracic width`` (widest horizontal extent
  of the heart mask over the widest inner rib-cage width, both in pixels) is drawn in 0.53-0.65 for
  positives and 0.38-0.47 for negatives; the label is ``CTR > 0.5`` (checked on the drawn masks).
- effusion: fluid in one or both lung bases up to a level, higher laterally (a meniscus), which blunts the
  costophrenic angle; box = the fluid region.
- nodule: a round opacity of 2.5-5 % of the image width in a lung, away from heart and fluid; box = it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medcfx.demo.common import (
    case_rng,
    check_cases,
    check_fraction,
    exact_subset,
    gauss_blur2d,
    set_rng,
    smooth_noise2d,
    staging_dir,
    write_csv,
)
from medcfx.errors import UsageError

FINDINGS = ("cardiomegaly", "effusion", "nodule")
DEFAULT_PREVALENCE = (0.30, 0.25, 0.20)
CTR_NEGATIVE = (0.38, 0.47)
CTR_POSITIVE = (0.53, 0.65)


def _down(mask_ss: np.ndarray, ss: int) -> np.ndarray:
    """Supersampled mask -> pixel mask (a pixel belongs when more than half of its samples do)."""
    n = mask_ss.shape[0] // ss
    return mask_ss.reshape(n, ss, n, ss).mean(axis=(1, 3)) > 0.5


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` with exclusive ends, or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def widest_row_extent(mask: np.ndarray) -> int:
    """The largest ``last - first + 1`` column span of ``mask`` over its rows (0 when empty)."""
    rows = np.nonzero(mask.any(axis=1))[0]
    best = 0
    for r in rows:
        cols = np.nonzero(mask[r])[0]
        best = max(best, int(cols[-1] - cols[0] + 1))
    return best


def chest_image(
    rng: np.random.Generator,
    cardiomegaly: bool = False,
    effusion: bool = False,
    nodule: bool = False,
    size: int = 128,
) -> tuple[np.ndarray, dict]:
    """One radiograph: returns (uint8 image, info).

    ``info``: ``ctr``; ``masks`` {"heart", "thorax" (both lungs' inner rib cage), "lungs", "effusion",
    "nodule"} as bool pixel arrays; ``bbox`` {finding: (x0, y0, x1, y1) or None} for the present findings;
    ``labels`` {finding: 0/1}.
    """
    ss = 2
    n = size * ss
    c = (np.arange(n) + 0.5) / n
    v, u = np.meshgrid(c, c, indexing="ij")  # u: 0 left .. 1 right, v: 0 top .. 1 bottom
    # patient pose: shift, scale, small rotation about the image centre
    sc = rng.uniform(0.9, 1.05)
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    rot = math.radians(rng.uniform(-4, 4))
    du, dv = u - cx, v - cy
    x = (math.cos(rot) * du + math.sin(rot) * dv) / sc  # body frame, centred, unit ~ image size
    y = (-math.sin(rot) * du + math.cos(rot) * dv) / sc

    # ---- geometry in body frame (x: -0.5..0.5, y: -0.5..0.5; patient's right = image left)
    half_thorax = rng.uniform(0.34, 0.39)  # inner rib-cage half width at its widest
    apex = rng.uniform(-0.40, -0.35)
    base = rng.uniform(0.20, 0.26)  # costophrenic angles (lowest lung points)
    widest = base - rng.uniform(0.08, 0.12)
    dome_h = rng.uniform(0.09, 0.13)
    med = rng.uniform(0.05, 0.065)  # mediastinum half width above the heart
    # lateral wall: a quarter ellipse from the apex to its widest level, then straight to the base
    e = np.clip((widest - y) / (widest - apex), 0, 1)
    lat = half_thorax * np.sqrt(np.clip(1 - e**2, 0, 1))
    thorax_rows = (y >= apex) & (y <= base) & (np.abs(x) <= lat)

    def dome(side: int) -> np.ndarray:
        """Diaphragm height (y) under each lung: highest near the middle of the hemithorax."""
        mid = side * half_thorax * 0.4
        lift = dome_h * (1.0 if side < 0 else 0.8)  # right dome higher, as usual
        return base - lift * np.clip(1 - ((x - mid) / (half_thorax * 0.7)) ** 2, 0, 1)

    dome_y = np.where(x < 0, dome(-1), dome(1))
    lungs = {side: thorax_rows & (side * x > med) & (y <= dome(side)) for side in (-1, 1)}
    thorax_px = _down(thorax_rows & (y <= dome_y), ss)
    thoracic_width_px = widest_row_extent(thorax_px)
    # heart: an ellipse left of the midline (image right) resting on the left dome
    ctr_target = rng.uniform(*(CTR_POSITIVE if cardiomegaly else CTR_NEGATIVE))
    heart_w = ctr_target * thoracic_width_px / size / sc  # body-frame units
    heart_h = heart_w * rng.uniform(0.6, 0.7)
    hx = heart_w * rng.uniform(0.15, 0.25)  # centre: about 2/3 of the heart lies left of the midline
    dome_at = float(base - dome_h * 0.8 * max(0.0, 1 - ((hx - half_thorax * 0.4) / (half_thorax * 0.7)) ** 2))
    hy = dome_at - heart_h * rng.uniform(0.12, 0.2)
    heart = (((x - hx) / (heart_w / 2)) ** 2 + ((y - hy) / (heart_h / 2)) ** 2 < 1) & (y <= dome_y)
    heart_px = _down(heart, ss)
    ctr = widest_row_extent(heart_px) / max(thoracic_width_px, 1)
    lung_air = (lungs[-1] | lungs[1]) & ~heart

    # ---- attenuation map (sum of tissue along the beam, arbitrary units)
    neck, torso = rng.uniform(0.1, 0.13), rng.uniform(0.44, 0.5)
    shoulder_y = apex - rng.uniform(0.03, 0.07)
    body_w = neck + (torso - neck) * np.clip((y - shoulder_y + 0.06) / 0.08, 0, 1) ** 0.5
    thick = np.clip(1 - (x / body_w) ** 2, 0, 1) ** 0.35
    A = 0.75 * thick
    A -= 0.5 * lung_air * np.clip(1 - (x / (lat + 1e-3)) ** 6, 0.2, 1) * np.clip((y - apex) / 0.06, 0.3, 1)
    # mediastinum widening downwards into the heart, with an aortic knob on the left
    med_w = med + 0.5 * np.clip((y - apex) / (hy - apex), 0, 1) ** 2 * np.clip(heart_w / 2 - med, 0, None) * 0.6
    knob = ((x - med * 1.1) / 0.045) ** 2 + ((y - (apex + 0.16)) / 0.04) ** 2 < 1
    mediastinum = ((np.abs(x) < med_w) & (y < dome_y) & (y > apex - 0.1)) | knob
    A += 0.45 * (heart | mediastinum)
    A += 0.12 * (np.abs(x) < 0.03) * (y > apex - 0.1)  # spine, faint through the mediastinum
    A -= 0.3 * ((np.abs(x) < 0.016) & (y < apex + 0.14) & (y > apex - 0.12))  # trachea
    A += 0.45 * ((y > dome_y) & (np.abs(x) < body_w)) * thick  # abdomen under the domes
    if rng.random() < 0.6:  # gastric air bubble under the left dome
        gx, gy = half_thorax * rng.uniform(0.3, 0.5), float(base - dome_h * 0.6) + rng.uniform(0.03, 0.05)
        A -= 0.2 * ((((x - gx) / 0.06) ** 2 + ((y - gy) / 0.035) ** 2 < 1) & (y > dome_y + 0.01))
    # posterior ribs: arcs from the spine up-and-out, then down along the lateral wall; anterior ribs fainter
    rib_t = rng.uniform(0.010, 0.014)
    rib_a = rng.uniform(0.09, 0.14)
    gap = (base - apex) / rng.uniform(9.0, 10.0)
    for k in range(11):
        y0 = apex - 0.02 + k * gap
        for side in (-1, 1):
            s_ = side * x
            curve = y0 + 2.0 * (s_ - 0.15) ** 2 - 2.0 * 0.12**2
            in_cage = (s_ > 0.03) & (s_ < lat + 0.03) & (y < dome_y + 0.02)
            A += rib_a * ((np.abs(y - curve) < rib_t * (1 + s_)) & in_cage)
            acurve = y0 + 0.1 + 1.2 * (s_ - half_thorax) ** 2
            A += 0.05 * ((np.abs(y - acurve) < rib_t * 1.3) & in_cage & (s_ > 0.1))
    for side in (-1, 1):  # clavicles
        s_ = side * x
        cl = apex + 0.08 - 0.22 * (s_ - 0.05) + 0.4 * (s_ - 0.2) ** 2
        A += 0.25 * ((np.abs(y - cl) < 0.016) & (s_ > 0.03) & (s_ < 0.36))

    # ---- findings
    eff_mask = np.zeros_like(lung_air)
    if effusion:
        sides = [-1, 1] if rng.random() < 0.3 else [int(rng.choice([-1, 1]))]
        for side in sides:
            lung = lungs[side] & ~heart
            depth = rng.uniform(0.08, 0.2)
            level = base - depth
            s = side * x
            lateral = np.clip((s - half_thorax * 0.3) / (half_thorax * 0.7), 0, 1)
            meniscus = level - rng.uniform(0.03, 0.06) * lateral**2  # fluid climbs the lateral wall
            fluid = lung & (y > meniscus)
            eff_mask |= fluid
            ramp = np.clip((y - meniscus) / 0.02, 0, 1)
            A += 0.8 * fluid * ramp
    nod_mask = np.zeros_like(lung_air)
    if nodule:
        ok = _down(lung_air & ~eff_mask & ~heart, ss)
        r = rng.uniform(0.025, 0.05) / 2 * size  # radius in pixels
        cand = np.argwhere(_erode(ok, int(math.ceil(r)) + 2))
        if cand.size == 0:
            cand = np.argwhere(ok)
        py, px = cand[rng.integers(len(cand))]
        yy_, xx_ = (np.arange(n) + 0.5) / ss - 0.5, (np.arange(n) + 0.5) / ss - 0.5
        d = np.sqrt((yy_[:, None] - py) ** 2 + (xx_[None, :] - px) ** 2)
        nod_mask = d < r
        A += 0.35 * np.clip((r + 0.5 - d) / 1.0, 0, 1)

    # ---- attenuation -> image
    k = rng.uniform(1.1, 1.5)
    img = 1 - np.exp(-k * np.clip(A, 0, None))
    img = img.reshape(size, ss, size, ss).mean(axis=(1, 3))
    img = gauss_blur2d(img, rng.uniform(0.5, 0.9))
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.2)
    img = img * rng.uniform(0.85, 1.0) + 0.03 * smooth_noise2d(rng, img.shape, size / 8)
    img = img + rng.normal(0, rng.uniform(0.01, 0.025), img.shape)
    out = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)

    masks = {
        "heart": heart_px,
        "thorax": thorax_px,
        "lungs": _down(lung_air, ss),
        "effusion": _down(eff_mask, ss),
        "nodule": _down(nod_mask, ss),
    }
    labels = {
        "cardiomegaly": int(ctr > 0.5),
        "effusion": int(masks["effusion"].any()),
        "nodule": int(masks["nodule"].any()),
    }
    bbox = {
        "cardiomegaly": bbox_of(heart_px) if labels["cardiomegaly"] else None,
        "effusion": bbox_of(masks["effusion"]),
        "nodule": bbox_of(masks["nodule"]),
    }
    return out, {"ctr": float(ctr), "masks": masks, "bbox": bbox, "labels": labels}


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a (2r+1) square (pixels outside the image count as background)."""
    return ndimage.binary_erosion(mask, structure=np.ones((2 * r + 1, 2 * r + 1), bool), border_value=0)


def _box_cell(b) -> str | None:
    return None if b is None else ";".join(str(v) for v in b)


def make_chest(
    out: str | Path,
    cases: int | None = None,
    seed: int = 0,
    *,
    size: int = 128,
    prevalence: tuple[float, float, float] = DEFAULT_PREVALENCE,
    unlabelled_fraction: float = 0.0,
    overwrite: bool = False,
) -> Path:
    """Write ``cases`` (default 400) radiographs and ``labels.csv`` into ``out``; returns ``out``.

    ``prevalence``: probabilities of cardiomegaly, effusion, nodule (drawn independently per image).
    ``unlabelled_fraction``: exactly ``round(f * cases)`` rows get empty label/box/meta_ctr cells.
    """
    n = check_cases(cases, 400)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 64 <= size <= 1024:
        raise UsageError(f"option size must be an integer in 64..1024, got {size!r}")
    try:
        prev = [check_fraction(f"prevalence[{i}]", p) for i, p in enumerate(prevalence)]
    except TypeError:
        raise UsageError(f"option prevalence must be three numbers in [0, 1], got {prevalence!r}") from None
    if len(prev) != 3:
        raise UsageError(f"option prevalence must be three numbers in [0, 1], got {prevalence!r}")
    rng = set_rng("chest", seed)
    unlabelled = exact_subset(rng, n, check_fraction("unlabelled_fraction", unlabelled_fraction))
    draws = rng.random((n, 3)) < np.asarray(prev)
    header = ["file", *FINDINGS, *(f"bbox_{f}" for f in FINDINGS), "meta_ctr"]
    rows = []
    with staging_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        for i in range(n):
            img, info = chest_image(case_rng("chest", seed, i), *map(bool, draws[i]), size=int(size))
            name = f"images/cxr_{i:05d}.png"
            Image.fromarray(img).save(tmp / name)
            if unlabelled[i]:
                rows.append([name] + [None] * 7)
            else:
                lab = info["labels"]
                rows.append(
                    [name, *(lab[f] for f in FINDINGS), *(_box_cell(info["bbox"][f]) for f in FINDINGS), info["ctr"]]
                )
        write_csv(tmp / "labels.csv", header, rows)
    return Path(out)
