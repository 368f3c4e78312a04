"""Synthetic BraTS-like multi-contrast brain MRI with gliomas (demo kind ``brain``).

Layout written by :func:`make_brain` (the BraTS convention)::

    out/demo_00000/demo_00000_t1.nii.gz      int16, skull-stripped (0 outside the brain)
    out/demo_00000/demo_00000_t1ce.nii.gz
    out/demo_00000/demo_00000_t2.nii.gz
    out/demo_00000/demo_00000_flair.nii.gz
    out/demo_00000/demo_00000_seg.nii.gz     uint8: 0 background, 1 necrotic / non-enhancing core,
                                              2 oedema, 4 enhancing tumour (BraTS labels)

Geometry: the volume covers a fixed 240 x 240 x 155 mm field of view, so the default shape is 1 mm
isotropic; other shapes change the voxel size (``spacing = 240/X, 240/Y, 155/Z``). The affine is RAS+
(``x`` to the right, ``y`` anterior, ``z`` superior) in MNI-like millimetres, volume centre at
(0, -17, 5) mm.

Model of one subject (all coordinates in world mm, so a case looks the same at every resolution):

1. Anatomy: tissue probability maps ``gm, wm, csf`` and a brain mask on a 1 mm MNI grid, either from the
   ICBM152 2009a maps that nilearn ships inside its wheel (``brain = t1 > 0`` of the skull-stripped
   template, ``csf = clip(brain - gm - wm, 0, 1)``), or procedural (ellipsoid brain, gyral GM ribbon cut by
   sulci, interhemispheric fissure, lateral ventricles, deep GM nuclei, WM inside).
2. Deformation ``q(p)`` from output point ``p`` to atlas point ``q``:
   ``q = c + M (p - c - t) + u(p) - m(p)``, with ``M`` a small rotation times an inverse per-axis scale,
   ``u`` a smooth random displacement (random Fourier field, wavelengths 50-150 mm, ``warp_mm`` rms per
   axis), and the mass effect ``m(p) = A (p - p0) / s * exp(-|p - p0|^2 / (2 s^2))`` around the tumour
   centre ``p0``, ``A = s / 2`` (the radial map stays monotone since ``A / s < 1``): the anatomy is
   pushed away from the tumour. Atlas maps are sampled at ``q`` by trilinear interpolation
   (``torch.nn.functional.grid_sample``).
3. Tumour (``1 - tumour_free_fraction`` of the cases): blobby level sets
   ``phi = |E (p - p0)| / R + a n(p) < 1`` with ``E`` a random anisotropic rotation and ``n`` a band-limited
   random field, for the core (radius 8-20 mm), the necrosis inside it and the oedema (1.3-2.2 x the
   core) which spreads in white matter only. 80 % are high grade (necrosis + enhancing rim + oedema), 20 %
   low grade (non-enhancing core, label 1, + oedema).
4. Contrast: each voxel mixes class means (table ``_MEANS``, relative units) with its tissue and soft
   tumour fractions (partial volume), times a smooth heterogeneity field inside lesions, times a smooth
   multiplicative bias field per contrast, plus Rician noise ``|I + s(n1 + i n2)|``, times a random
   scanner gain, rounded to int16. T1ce equals T1 before bias and noise except inside enhancing tumour.

Everything is vectorised in numpy/torch; scipy is not used. See docs/data.md for what is NOT modelled.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medcfx.demo.common import case_rng, check_cases, check_fraction, exact_subset, set_rng, staging_dir
from medcfx.errors import UsageError

MODALITIES = ("t1", "t1ce", "t2", "flair")
SEG_LABELS = {"necrotic_core": 1, "oedema": 2, "enhancing": 4}
DEFAULT_SHAPE = (240, 240, 155)
FOV_MM = np.array([240.0, 240.0, 155.0])
CENTRE_MM = np.array([0.0, -17.0, 5.0])

# the 1 mm MNI152 grid of nilearn's ICBM152 2009a maps (the procedural atlas uses the same grid)
_ATLAS_SHAPE = (197, 233, 189)
_ATLAS_ORIGIN = np.array([-98.0, -134.0, -72.0])
_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# class means per contrast, relative units (T1 white matter = 1). Classes:
#   csf, gm, wm, necrosis, enhancing, oedema, solid (non-enhancing core of low-grade tumours)
_CLASSES = ("csf", "gm", "wm", "necrosis", "enhancing", "oedema", "solid")
_MEANS = {
    #         csf   gm    wm    nec   enh   oed   solid
    "t1":    [0.30, 0.70, 1.00, 0.38, 0.60, 0.64, 0.55],
    "t1ce":  [0.30, 0.70, 1.00, 0.38, 1.50, 0.64, 0.55],  # == t1 except enhancing (checked in tests)
    "t2":    [1.00, 0.60, 0.45, 1.05, 0.72, 0.85, 0.82],
    "flair": [0.18, 0.68, 0.57, 0.42, 0.80, 0.86, 0.82],
}


# ----------------------------------------------------------------------------------------------------------
# band-limited random fields


class FourierField:
    """A smooth random scalar field on world coordinates: ``f(p) = sqrt(2/J) sum_j cos(k_j . p + phase_j)``.

    Wave vectors have random directions and wavelengths log-uniform in ``wavelengths`` (mm), so ``f`` has
    zero mean and unit variance over space, and it is defined at any point (resolution independent).
    """

    def __init__(self, rng: np.random.Generator, wavelengths: tuple[float, float], waves: int = 16):
        d = rng.standard_normal((waves, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        lam = np.exp(rng.uniform(math.log(wavelengths[0]), math.log(wavelengths[1]), waves))
        self.k = torch.from_numpy((d * (2 * math.pi / lam)[:, None]).astype(np.float32))
        self.phase = torch.from_numpy(rng.uniform(0, 2 * math.pi, waves).astype(np.float32))
        self.amp = math.sqrt(2.0 / waves)

    def __call__(self, pts: torch.Tensor) -> torch.Tensor:
        """``pts``: (N, 3) float32 world mm -> (N,) float32."""
        out = torch.empty(pts.shape[0], dtype=torch.float32)
        step = 1 << 18
        for s in range(0, pts.shape[0], step):
            p = pts[s : s + step]
            out[s : s + step] = torch.cos(p @ self.k.T + self.phase).sum(1) * self.amp
        return out


def _grid_points(shape, origin, spacing) -> torch.Tensor:
    """World coordinates (N, 3) of all voxel centres of a grid, in C order."""
    axes = [torch.arange(n, dtype=torch.float32) * float(s) + float(o) for n, s, o in zip(shape, spacing, origin)]
    g = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([a.reshape(-1) for a in g], 1)


# ----------------------------------------------------------------------------------------------------------
# anatomy (atlas) sources


def nilearn_template_dir() -> Path | None:
    """The folder holding nilearn's packaged ICBM152 maps, found WITHOUT importing nilearn; None if absent."""
    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "datasets" / "data"
        if all((d / f).is_file() for f in _TEMPLATE_FILES.values()):
            return d
    return None


@dataclass(frozen=True)
class Atlas:
    """Tissue maps on the 1 mm MNI grid: ``maps`` is (4, 197, 233, 189) float32 = gm, wm, csf, brain."""

    source: str  # "template" or "procedural"
    maps: torch.Tensor
    candidates: np.ndarray  # (M, 3) world mm points deep in supratentorial white matter (tumour centres)


def _soften(onehot: torch.Tensor) -> torch.Tensor:
    """3x3x3 box average: hard labels -> partial-volume fractions."""
    return F.avg_pool3d(onehot[None], 3, stride=1, padding=1, count_include_pad=False)[0]


def _load_template(d: Path) -> torch.Tensor:
    import nibabel as nib

    arrs = {}
    for key, name in _TEMPLATE_FILES.items():
        img = nib.load(str(d / name))
        if img.shape != _ATLAS_SHAPE or not np.allclose(img.affine[:3, 3], _ATLAS_ORIGIN):
            raise UsageError(f"unexpected grid in nilearn template {d / name}; use anatomy='procedural'")
        arrs[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    brain = _soften(torch.from_numpy((arrs["t1"] > 0).astype(np.float32))[None])[0]
    gm = torch.from_numpy(arrs["gm"]) * brain
    wm = torch.from_numpy(arrs["wm"]) * brain
    tot = gm + wm
    over = tot > brain
    scale = torch.where(over, brain / tot.clamp_min(1e-6), torch.ones_like(tot))
    gm, wm = gm * scale, wm * scale
    csf = (brain - gm - wm).clamp(0, 1)
    return torch.stack([gm, wm, csf, brain])


def _procedural_atlas() -> torch.Tensor:
    """A fixed procedural brain on the MNI grid (seeded, so always the same atlas)."""
    rng = np.random.default_rng(20240607)
    pts = _grid_points(_ATLAS_SHAPE, _ATLAS_ORIGIN, (1.0, 1.0, 1.0))
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    centre = torch.tensor([0.0, -18.0, 10.0])
    semi = torch.tensor([68.0, 86.0, 62.0])
    # the smooth fields (wavelengths >= 14 mm) are evaluated on a 2 mm grid and upsampled trilinearly
    half = tuple((n + 1) // 2 for n in _ATLAS_SHAPE)
    cpts = _grid_points(half, _ATLAS_ORIGIN, (2.0, 2.0, 2.0))
    lobes, gyri_f = FourierField(rng, (60, 140), 12), FourierField(rng, (14, 32), 32)
    coarse = torch.stack([lobes(cpts), gyri_f(cpts)]).reshape(1, 2, *half)
    size = tuple(2 * (n - 1) + 1 for n in half)
    fine = F.interpolate(coarse, size=size, mode="trilinear", align_corners=True)[0]
    fine = fine[:, : _ATLAS_SHAPE[0], : _ATLAS_SHAPE[1], : _ATLAS_SHAPE[2]].reshape(2, -1)
    r = torch.linalg.norm((pts - centre) / semi, dim=1) * (1 + 0.035 * fine[0])
    depth = (1 - r) * 64.0  # approximately mm below the brain surface
    gyri = fine[1]
    brain = depth > 0
    csf = brain & ((depth < 1.2) | ((depth < 20) & (gyri.abs() < 0.12)))
    csf |= brain & (x.abs() < 1.5) & (z > -8) & (depth < 45)  # interhemispheric fissure
    for sx in (-1.0, 1.0):  # lateral ventricles (bodies and a frontal horn)
        csf |= ((x - 11 * sx) / 6) ** 2 + ((y + 8) / 26) ** 2 + ((z - 14) / 8) ** 2 < 1
        csf |= ((x - 13 * sx) / 5) ** 2 + ((y - 14) / 9) ** 2 + ((z - 6) / 9) ** 2 < 1
    csf &= brain
    gm = brain & ~csf & ((depth < 4.5) | ((gyri.abs() < 0.75) & (depth < 23)))
    deep = torch.zeros_like(brain)
    for sx in (-1.0, 1.0):  # thalamus / basal ganglia
        deep |= ((x - 14 * sx) / 8) ** 2 + ((y + 14) / 13) ** 2 + ((z - 2) / 8) ** 2 < 1
    deep &= brain & ~csf
    wm = brain & ~csf & ~gm & ~deep
    onehot = torch.stack(
        [gm.float() + 0.65 * deep.float(), wm.float() + 0.35 * deep.float(), csf.float(), brain.float()]
    ).reshape(4, *_ATLAS_SHAPE)
    return _soften(onehot)


def load_atlas(source: str) -> Atlas:
    """``source``: "template" (nilearn's ICBM152 maps; UsageError if absent) or "procedural". Cached."""
    if source == "template":
        d = nilearn_template_dir()
        if d is None:
            raise UsageError("anatomy='template' needs nilearn installed (pip install 'medcfx[anatomy]')")
        return _atlas(source, d)
    if source == "procedural":
        return _atlas(source, None)
    raise UsageError(f"option anatomy must be auto, template or procedural, got {source!r}")


@functools.lru_cache(maxsize=2)
def _atlas(source: str, folder: Path | None) -> Atlas:
    maps = _load_template(folder) if folder is not None else _procedural_atlas()
    gm, wm, csf, brain = maps
    idx = torch.nonzero(brain > 0.5)
    lo, hi = idx.min(0).values.float(), idx.max(0).values.float()
    centre, semi = (lo + hi) / 2, (hi - lo) / 2
    deep = torch.nonzero(wm > 0.9)
    rn = torch.linalg.norm((deep.float() - centre) / semi, dim=1)
    world = deep.double().numpy() + _ATLAS_ORIGIN
    keep = (rn.numpy() < 0.62) & (world[:, 2] > -5.0)
    cand = world[keep]
    if len(cand) > 20000:
        cand = cand[:: len(cand) // 20000]
    return Atlas(source=source, maps=maps.contiguous(), candidates=cand)


def resolve_anatomy(anatomy: str) -> str:
    if anatomy == "auto":
        return "template" if nilearn_template_dir() is not None else "procedural"
    if anatomy not in ("template", "procedural"):
        raise UsageError(f"option anatomy must be auto, template or procedural, got {anatomy!r}")
    return anatomy


@functools.lru_cache(maxsize=4)
def _atlas_for_spacing(source: str, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Atlas maps pre-averaged over ``kernel`` voxels, so coarse output grids get partial volume, not aliasing."""
    maps = load_atlas(source).maps[None]
    for axis, k in enumerate(kernel):  # separable box filter: three 1-D passes
        if k > 1:
            ks = [1, 1, 1]
            ks[axis] = k
            maps = F.avg_pool3d(maps, tuple(ks), stride=1, padding=tuple(v // 2 for v in ks), count_include_pad=False)
    return maps


# ----------------------------------------------------------------------------------------------------------
# one case


def brain_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """RAS+ voxel-to-world affine of an output grid: fixed 240 x 240 x 155 mm field of view centred at
    (0, -17, 5) mm, spacing ``FOV / shape``."""
    shape_a = np.asarray(shape, dtype=np.float64)
    spacing = FOV_MM / shape_a
    origin = CENTRE_MM - spacing * (shape_a - 1) / 2
    aff = np.diag(np.append(spacing, 1.0))
    aff[:3, 3] = origin
    return aff


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_orthonormal(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def brain_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    tumour: bool = True,
    anatomy: str = "auto",
    noise: float = 0.025,
    bias: float = 0.12,
    warp_mm: float = 2.5,
) -> dict:
    """Generate one subject. Returns a dict with

    ``images``: {modality: int16 (X, Y, Z)}, ``seg``: uint8 (X, Y, Z), ``affine``: (4, 4),
    ``brain``: bool mask, ``tissue``: {"gm", "wm", "csf": float32 fractions (sum 1 inside the brain)},
    ``params``: dict (anatomy source, tumour centre/radii/grade, gains, ...).
    """
    shape = tuple(int(s) for s in shape)
    source = resolve_anatomy(anatomy)
    atlas = load_atlas(source)
    aff = brain_affine(shape)
    spacing, origin = np.diag(aff)[:3], aff[:3, 3]
    params: dict = {"anatomy": source, "shape": list(shape), "spacing_mm": spacing.round(4).tolist()}

    # --- subject transform p -> q (output world -> atlas world)
    c = CENTRE_MM
    scale = rng.uniform(0.88, 0.99) * rng.uniform(0.97, 1.03, 3)
    M = _rotation(rng, 4.0) @ np.diag(1.0 / scale)
    t = rng.uniform(-3, 3, 3)
    warp = [FourierField(rng, (50, 150), 8) for _ in range(3)]
    bias_fields = [FourierField(rng, (110, 320), 6) for _ in MODALITIES]
    het = FourierField(rng, (8, 30), 24)
    grade = None
    if tumour:
        q0 = atlas.candidates[rng.integers(len(atlas.candidates))]
        p0 = c + t + np.linalg.solve(M, q0 - c)  # tumour centre in output space (ignoring the small warp)
        grade = "HGG" if rng.random() < 0.8 else "LGG"
        r_core = rng.uniform(8, 20)
        r_oed = r_core * rng.uniform(1.3, 2.2)
        E = _random_orthonormal(rng) @ np.diag(1.0 / rng.uniform(0.8, 1.25, 3))
        nec_frac = rng.uniform(0.45, 0.8) if grade == "HGG" else 0.0
        nec_off = rng.normal(0, 0.12 * r_core, 3)
        s_mass = 1.2 * r_core + 4.0
        fields = [FourierField(rng, (10, 40), 20) for _ in range(3)]
        params["tumour"] = {
            "grade": grade,
            "centre_mm": p0.round(2).tolist(),
            "core_radius_mm": round(float(r_core), 2),
            "oedema_radius_mm": round(float(r_oed), 2),
            "necrosis_fraction": round(float(nec_frac), 3),
            "mass_effect_sigma_mm": round(float(s_mass), 2),
        }
    means = {m: np.asarray(v) * rng.normal(1.0, 0.04, len(v)) for m, v in _MEANS.items()}
    means["t1ce"][[0, 1, 2, 3, 5, 6]] = means["t1"][[0, 1, 2, 3, 5, 6]]  # t1ce == t1 outside enhancing
    gains = {m: 1000.0 * rng.uniform(0.8, 1.25) for m in MODALITIES}
    params["gains"] = {m: round(g, 2) for m, g in gains.items()}

    # --- atlas coordinates of every output voxel, directly in grid_sample's normalised units
    # (grid_sample wants (x=W=last axis, y=H, z=D) in [-1, 1] with align_corners=True)
    X, Y, Z = shape
    axes = [torch.arange(n, dtype=torch.float32) * float(s) + float(o) for n, s, o in zip(shape, spacing, origin)]
    view = [(X, 1, 1), (1, Y, 1), (1, 1, Z)]
    rel = [(a - float(ci + ti)).view(v) for a, ci, ti, v in zip(axes, c, t, view)]
    # smooth fields (warp, bias) are evaluated on a coarse (~8 mm) grid spanning the output grid
    cshape = tuple(int(min(n, max(2, math.ceil(n * s / 8.0) + 1))) for n, s in zip(shape, spacing))
    cspace = [(n - 1) * s / max(cn - 1, 1) for n, s, cn in zip(shape, spacing, cshape)]
    cpts = _grid_points(cshape, origin, cspace)
    coarse_warp = torch.stack([f(cpts).reshape(cshape) for f in warp])[None] * float(warp_mm)
    coarse_bias = torch.stack([f(cpts).reshape(cshape) for f in bias_fields])[None]
    u = F.interpolate(coarse_warp, size=shape, mode="trilinear", align_corners=True)[0]
    if tumour:  # mass effect, only inside a box where it is not negligible (3.5 sigma)
        box = []
        for a, p in zip(axes, p0):
            inside = torch.nonzero((a - float(p)).abs() < 3.5 * s_mass).squeeze(1)
            box.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.numel() else slice(0, 0))
        d = [(a[b] - float(p)).view([-1 if n > 1 else 1 for n in v]) for a, b, p, v in zip(axes, box, p0, view)]
        w = torch.exp(-(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) / (2.0 * s_mass**2)) * 0.5  # A / s = 0.5
        for i in range(3):
            u[i][box[0], box[1], box[2]] -= w * d[i]
        del w
    grid = torch.empty((1, X, Y, Z, 3), dtype=torch.float32)
    for i in range(3):
        a = 2.0 / (_ATLAS_SHAPE[i] - 1)
        b = -1.0 - a * float(_ATLAS_ORIGIN[i])
        qi = u[i].mul_(a)
        for j in range(3):
            qi += rel[j] * float(M[i, j] * a)
        qi += float(c[i] * a + b)
        grid[0, ..., 2 - i] = qi
    del u, qi

    # --- sample the atlas
    kernel = tuple(int(2 * math.floor(s / 2) + 1) if s >= 1.5 else 1 for s in spacing)
    maps = _atlas_for_spacing(source, kernel)
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    del grid
    brain = sampled[3] > 0.5
    idx = torch.nonzero(brain.reshape(-1)).squeeze(1)
    flat = sampled.reshape(4, -1)[:, idx]
    del sampled
    tot = flat[:3].sum(0).clamp_min(1e-6)
    gm, wm, csf = flat[0] / tot, flat[1] / tot, flat[2] / tot
    ii = torch.stack([idx // (Y * Z), (idx // Z) % Y, idx % Z], 1).float()
    pts = ii * torch.from_numpy(spacing.astype(np.float32)) + torch.from_numpy(origin.astype(np.float32))
    n_b = idx.numel()
    norm = 2.0 * ii / torch.tensor([max(n - 1, 1) for n in shape], dtype=torch.float32) - 1.0
    bias_at = F.grid_sample(coarse_bias, norm[:, [2, 1, 0]].view(1, 1, 1, -1, 3), align_corners=True)
    bias_at = bias_at.view(len(MODALITIES), -1)

    # --- tumour fractions (soft, for intensities) and labels (hard)
    s_core = torch.zeros(n_b)
    s_nec = torch.zeros(n_b)
    s_oed = torch.zeros(n_b)
    seg_b = torch.zeros(n_b, dtype=torch.uint8)
    if tumour:
        rel_p = pts - torch.from_numpy(p0.astype(np.float32))
        near = torch.nonzero(torch.linalg.norm(rel_p, dim=1) < 1.75 * max(r_oed, r_core / 0.55) + 3).squeeze(1)
        P, R = pts[near], rel_p[near]
        dE = torch.linalg.norm(R @ torch.from_numpy(E.T.astype(np.float32)), dim=1)
        n1, n2, n3 = (f(P).clamp(-2, 2) for f in fields)
        phi_core = dE / r_core + 0.2 * n1
        tau = 0.07
        core = torch.sigmoid((1 - phi_core) / tau)
        if nec_frac > 0:
            dn = torch.linalg.norm(R - torch.from_numpy(nec_off.astype(np.float32)), dim=1)
            phi_nec = dn / (r_core * nec_frac) + 0.2 * n2
            nec = torch.sigmoid((1 - phi_nec) / tau) * core
            nec_hard = (phi_nec < 1) & (phi_core < 1)
        else:
            nec = core  # low grade: the whole core is non-enhancing (label 1)
            nec_hard = phi_core < 1
        phi_oed = torch.linalg.norm(R, dim=1) / r_oed + 0.3 * n3
        gate = ((wm[near] + 0.3 * gm[near] - 0.25) / 0.3).clamp(0, 1)
        oed = torch.sigmoid((1 - phi_oed) / (2 * tau)) * gate * (1 - core)  # oedema fades more slowly
        oed_hard = (phi_oed < 1) & (gate > 0.5) & (phi_core >= 1)
        s_core[near], s_nec[near], s_oed[near] = core, nec, oed
        lab = torch.zeros(near.numel(), dtype=torch.uint8)
        lab[oed_hard] = 2
        lab[phi_core < 1] = 4 if nec_frac > 0 else 1
        lab[nec_hard] = 1
        seg_b[near] = lab
        params["tumour"]["voxels"] = {str(k): int((lab == k).sum()) for k in (1, 2, 4)}
    s_enh = s_core - s_nec
    normal = (1 - s_core - s_oed).clamp_min(0)

    # --- intensities
    hetf = torch.ones(n_b)
    if tumour:
        hetf[near] = torch.exp(0.10 * het(P))
    sig_noise = np.random.default_rng(rng.integers(2**63)).standard_normal
    images = {}
    ref = None
    for k, m in enumerate(MODALITIES):
        mu = [float(v) for v in means[m]]
        tissue = gm * mu[1] + wm * mu[2] + csf * mu[0]
        I = normal * tissue
        if tumour:
            lesion = s_nec * (mu[3] if nec_frac > 0 else mu[6]) + s_enh * mu[4] + s_oed * mu[5]
            I = I + lesion * hetf
        if m == "t1":
            ref = I
        if m == "t1ce":  # t1ce = t1 + enhancement (identical otherwise, before bias and noise)
            I = ref + (s_enh * (mu[4] - float(means["t1"][4])) * hetf if tumour else 0.0)
        I = I * torch.exp(float(bias) * bias_at[k])
        sd = float(noise)
        n_re = torch.from_numpy(sig_noise(n_b, dtype=np.float32))
        n_im = torch.from_numpy(sig_noise(n_b, dtype=np.float32))
        I = torch.sqrt((I + sd * n_re) ** 2 + (sd * n_im) ** 2)
        vol = torch.zeros(X * Y * Z, dtype=torch.int16)
        vol[idx] = (I * gains[m]).round().clamp(1, 32767).to(torch.int16)
        images[m] = vol.reshape(shape).numpy()
    seg = torch.zeros(X * Y * Z, dtype=torch.uint8)
    seg[idx] = seg_b
    tissue_maps = {}
    for name, v in (("gm", gm), ("wm", wm), ("csf", csf)):
        full = torch.zeros(X * Y * Z)
        full[idx] = v
        tissue_maps[name] = full.reshape(shape).numpy()
    return {
        "images": images,
        "seg": seg.reshape(shape).numpy(),
        "affine": aff,
        "brain": brain.numpy(),
        "tissue": tissue_maps,
        "params": params,
    }


# ----------------------------------------------------------------------------------------------------------
# the dataset


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        s = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        raise UsageError(f"option shape must be three positive integers, got {shape!r}") from None
    if len(s) != 3 or min(s) < 8:
        raise UsageError(f"option shape must be three integers >= 8, got {shape!r}")
    return s


def make_brain(
    out: str | Path,
    cases: int | None = None,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    tumour_free_fraction: float = 0.25,
    anatomy: str = "auto",
    noise: float = 0.025,
    bias: float = 0.12,
    warp_mm: float = 2.5,
    prefix: str = "demo",
    overwrite: bool = False,
) -> Path:
    """Write ``cases`` (default 20) BraTS-style case folders into ``out``; returns ``out``.

    Exactly ``round(tumour_free_fraction * cases)`` cases have no tumour (an all-zero seg). ``anatomy``:
    "auto" (nilearn's ICBM152 maps when installed, else procedural), "template" or "procedural". ``noise`` is
    the sigma of the Rician noise (white-matter T1 = 1), ``bias`` the standard deviation of the log bias
    field, ``warp_mm`` the rms of the smooth random displacement per axis, ``prefix`` the case-id prefix.
    """
    n = check_cases(cases, 20)
    shape = _check_shape(shape)
    free = exact_subset(set_rng("brain", seed), n, check_fraction("tumour_free_fraction", tumour_free_fraction))
    source = resolve_anatomy(anatomy)
    for name, v in (("noise", noise), ("bias", bias), ("warp_mm", warp_mm)):
        if not isinstance(v, (int, float)) or v < 0:
            raise UsageError(f"option {name} must be a non-negative number, got {v!r}")
    with staging_dir(out, overwrite) as tmp:
        for i in range(n):
            case = f"{prefix}_{i:05d}"
            res = brain_case(
                case_rng("brain", seed, i), shape, tumour=not free[i], anatomy=source, noise=noise, bias=bias,
                warp_mm=warp_mm,
            )
            d = tmp / case
            d.mkdir()
            for m in MODALITIES:
                _save_nifti(res["images"][m], res["affine"], d / f"{case}_{m}.nii.gz")
            _save_nifti(res["seg"], res["affine"], d / f"{case}_seg.nii.gz")
    return Path(out)


# ----------------------------------------------------------------------------------------------------------
# the FLAIR-threshold baseline


def best_threshold_dice(values: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The best Dice of ``values >= thr`` against ``truth`` over all thresholds, and that threshold.

    Sorting the values in decreasing order, predicting the top ``k`` voxels gives
    ``Dice_k = 2 TP_k / (k + P)`` with ``TP_k`` the running count of true voxels and ``P`` their total; only
    ``k`` at the end of a run of equal values is a realisable threshold.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    y = np.asarray(truth, dtype=bool).ravel()
    if y.sum() == 0:
        return float("nan"), float("nan")
    order = np.argsort(-v, kind="stable")
    vs, ys = v[order], y[order]
    tp = np.cumsum(ys)
    k = np.arange(1, v.size + 1)
    ends = np.append(vs[1:] != vs[:-1], True)
    dice = np.where(ends, 2.0 * tp / (k + y.sum()), -1.0)
    j = int(np.argmax(dice))
    return float(dice[j]), float(vs[j])


def flair_dice_study(cases: int = 6, seed: int = 0, shape=DEFAULT_SHAPE, anatomy: str = "auto") -> dict:
    """Generate ``cases`` tumour-bearing subjects and measure how well FLAIR alone thresholds the whole
    tumour (seg > 0) over brain voxels: the best Dice per case, and the best single threshold over all
    cases pooled after dividing each FLAIR by its median brain intensity. Also times the generation."""
    per_case, pooled_v, pooled_y, times = [], [], [], []
    for i in range(cases):
        t0 = time.perf_counter()
        res = brain_case(case_rng("brain", seed, i), shape, tumour=True, anatomy=anatomy)
        times.append(time.perf_counter() - t0)
        b = res["brain"]
        f = res["images"]["flair"][b].astype(np.float64)
        y = res["seg"][b] > 0
        per_case.append(best_threshold_dice(f, y)[0])
        pooled_v.append(f / np.median(f))
        pooled_y.append(y)
    pooled = best_threshold_dice(np.concatenate(pooled_v), np.concatenate(pooled_y))
    return {
        "per_case_dice": per_case,
        "mean_per_case_dice": float(np.mean(per_case)),
        "pooled_dice": pooled[0],
        "pooled_threshold": pooled[1],
        "seconds_per_case": times,
    }
