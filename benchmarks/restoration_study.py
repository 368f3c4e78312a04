"""Why is restoration's pixel AP low on the demo brains? Measurements on the VALIDATION set (issue 18).

    python benchmarks/restoration_study.py --home H --val /work/demo-data/brain-val \\
        --model restoration-fold0 --variants "8000 steps=restoration-f0-8k;T2 + FLAIR=restoration-f0-t2flair" \\
        --write-docs docs/benchmarks.md

Every number is scored by the code ``medcfx evaluate`` uses (:func:`medcfx.scoring.score_cases`: maps on each
input's own grid, inside its foreground), on ``--max-slices`` slices per validation case; nothing here looks at
the test set, so what it leads to is not tuned on it. Four questions:

1. resolution: the best map a grid of S x S pixels can hold, the lesion's own area fraction per model pixel
   (``SliceGeometry.to_model`` of the lesion indicator) brought back to the input grid like every map; its AP
   is the ceiling of any method working at S (48 px is the demo preset).
2. the channel and its normalisation: the model's own input (T2 at 48 px, per-scan 99th percentile, clipped)
   thresholded as a map, beside FLAIR on the same grid, and the share of lesion / other brain voxels the
   clip saturates.
3. brain-edge rims and sampling noise: the share of the map's mass in the outer band of the brain (1 and 2 model pixels) on
   lesion-free pixels, and the AP after the band is set to 0 (a foreground-eroded map); the AP of the mean
   map of 3 restorations of one model (what an ensemble averages away besides the models' differences).
4. the model: the AP of the trained variants (``--variants``) with the same maps and slices.

Results: W/study.json, and the docs section with --write-docs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from common import write_section
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("pixel_AUPRC", "pixel_ideal_Dice_oracle", "image_AUROC")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def cases(data: Path, pre: dict, max_slices: int, channels: int):
    from medcfx.data.preprocess import PreprocessConfig
    from medcfx.evaluation import cases_reader

    return cases_reader(PreprocessConfig.from_dict(pre), channels, {"max_slices": max_slices})(data)


def score(pairs) -> dict:
    """Metrics of precomputed model-sized maps: ``pairs`` yields (case, maps float32 [n, S, S])."""
    from medcfx.scoring import score_cases

    cur = {}

    def each():
        for case, maps in pairs:
            cur["maps"] = np.asarray(maps, dtype=np.float32)
            yield case

    cm = score_cases(each(), lambda x, s: torch.from_numpy(cur["maps"][s:s + len(x)]), batch_size=1 << 20)
    m = cm.compute()
    return {k: float(m[k]) for k in KEYS}


def lesion_fraction(case) -> np.ndarray:
    """Share of each model pixel covered by lesion, float32 [n, S, S], for the case's sampled slices."""
    geom = case.result.geometry
    frac = geom.to_model((np.asarray(case.result.lesion) > 0).astype(np.float32))
    rows = np.searchsorted(np.asarray(geom.kept), case.slice_index)
    return frac[rows].astype(np.float32)


def foreground(case) -> np.ndarray:
    """Model-sized brain mask [n, S, S]: any channel above the background value -1."""
    return (np.asarray(case.images) > -1 + 1e-6).any(1)


def resolution_ceiling(val: Path, pre: dict, sizes, max_slices: int) -> dict:
    out = {}
    for s in sizes:
        out[str(s)] = score((c, lesion_fraction(c)) for c in cases(val, {**pre, "size": s}, max_slices, len(pre["modalities"])))
        log(f"resolution ceiling {s} px: AP {out[str(s)]['pixel_AUPRC']:.3f}")
    return out


def channel_maps(val: Path, pre: dict, max_slices: int) -> dict:
    """Thresholding the model's own input grid and normalisation, T2 and FLAIR; saturated shares."""
    out = {}
    for clip in (True, False):
        p = {**pre, "modalities": ["t2", "flair"], "clip": clip}
        for k, ch in enumerate(("t2", "flair")):
            key = f"{ch} ({'99th percentile, clipped' if clip else '99th percentile, not clipped'})"
            out[key] = score((c, np.asarray(c.images)[:, k]) for c in cases(val, p, max_slices, 2))
            log(f"threshold {key}: AP {out[key]['pixel_AUPRC']:.3f}")
    sat = {"lesion": [0, 0], "other brain": [0, 0]}
    for c in cases(val, {**pre, "modalities": ["t2"]}, max_slices, 1):
        x, frac, fg = np.asarray(c.images)[:, 0], lesion_fraction(c), foreground(c)
        for name, where in (("lesion", frac >= 0.5), ("other brain", fg & (frac == 0))):
            sat[name][0] += int((x[where] >= 1 - 1e-6).sum())
            sat[name][1] += int(where.sum())
    out["t2 saturated share"] = {k: v[0] / max(v[1], 1) for k, v in sat.items()}
    return out


def rims(val: Path, ref: str, max_slices: int, steps: int, bands=(1, 2)) -> dict:
    """Map mass in the outer brain band on lesion-free pixels, and the AP with that band set to 0."""
    from medcfx.registry import Registry
    from medcfx_restoration.infer import METHOD, Mapper, Params, load_members

    members, pre = load_members(Registry(os.environ["MEDCFX_HOME"]), [ref], METHOD, "cpu")
    mapper = Mapper(members, Params(steps=steps), seed=0, method=METHOD)
    kept = []
    for c in cases(val, pre, max_slices, mapper.channels):
        x = torch.from_numpy(np.ascontiguousarray(c.images))
        maps = torch.cat([mapper(x[i:i + 16], start=i)[1] for i in range(0, len(x), 16)]).numpy()
        kept.append((c, maps))
        log(f"rims: mapped {c.id}")
    out = {"map as is": score(iter(kept))}
    # sampling noise: the mean map of 3 restorations of the same model (its own noise each)
    three = Mapper(members * 3, Params(steps=steps), seed=0, method=METHOD)
    out["mean of 3 samples"] = score(
        (c, torch.cat([three(torch.from_numpy(np.ascontiguousarray(c.images[i:i + 16])), start=i)[1]
                       for i in range(0, len(c.images), 16)]).numpy()) for c, _ in kept)
    log(f"rims: 3 samples averaged AP {out['mean of 3 samples']['pixel_AUPRC']:.3f}")
    for b in bands:  # the outer band of the brain at the model's grid
        mass, share, eroded = [0.0, 0.0], [0, 0], []
        for c, maps in kept:
            fg, frac = foreground(c), lesion_fraction(c)
            core = np.stack([ndimage.binary_erosion(f, iterations=b) for f in fg])
            band, healthy = fg & ~core, fg & (frac == 0)
            mass[0] += float(maps[band & healthy].sum())
            mass[1] += float(maps[healthy].sum())
            share[0] += int((band & healthy).sum())
            share[1] += int(healthy.sum())
            eroded.append((c, np.where(core, maps, 0).astype(np.float32)))
        out[f"band {b} px"] = {"map share on lesion-free pixels": mass[0] / mass[1],
                               "area share of lesion-free pixels": share[0] / share[1],
                               **score(iter(eroded))}
        log(f"rims band {b}: mass share {mass[0] / mass[1]:.3f} of area {share[0] / share[1]:.3f}, AP eroded "
            f"{out[f'band {b} px']['pixel_AUPRC']:.3f}")
    return out, pre


def variants(val: Path, spec: str, max_slices: int, steps: int, work: Path) -> dict:
    """``name=REF[|OPTIONS]`` items separated by ";" (REF may be an ensemble a,b,c; OPTIONS further evaluate
    options, e.g. ``--samples 3``) evaluated on the validation set with ``medcfx evaluate`` (1 - SSIM and
    residual)."""
    from restoration_demo import evaluate

    env = dict(os.environ)
    out = {}
    for item in filter(None, spec.split(";")):
        name, ref = item.split("=")
        ref, _, extra = ref.partition("|")  # REF|--samples 3: further evaluate options
        tag = (ref + extra).replace(":", "_").replace(",", "+").replace(" ", "").replace("--", "_")
        for kind in ("ssim", "residual"):
            m = evaluate("restoration", ref, val, work / "variants" / f"{tag}_{kind}",
                         ["--max-slices", max_slices, "--steps", steps, "--seed", 0, "--map", kind, *extra.split()], env)
            out[f"{name} ({ref}), {kind}"] = {k: float(m[k]) for k in KEYS}
            log(f"{name} {kind}: AP {m['pixel_AUPRC']:.3f}")
    return out


def markdown(result: dict) -> str:
    def row(name, m):
        return f"| {name} | {m['pixel_AUPRC']:.3f} | {m['pixel_ideal_Dice_oracle']:.3f} |"

    lines = ["| map (validation set) | pixel AP | ideal Dice |", "|---|---|---|"]
    lines += [row(f"lesion fraction at {s} px (ceiling of any {s}-px map)", m) for s, m in result["resolution"].items()]
    lines += [row(f"thresholding {k} at {result['size']} px", m) for k, m in result["channels"].items() if "share" not in k]
    lines += [row(f"{result['model']}, 1 - SSIM, as is", result["rims"]["map as is"])]
    lines += [row(f"{result['model']}, 1 - SSIM, outer {k} set to 0", m) for k, m in result["rims"].items() if k.startswith("band")]
    lines += [row(f"{result['model']}, 1 - SSIM, mean of 3 samples", result["rims"]["mean of 3 samples"])]
    lines += [row(k, m) for k, m in result["variants"].items()]
    return "\n".join(lines) + "\n"


def write_docs(path: Path, result: dict, command: str) -> None:
    """Create or replace this study's section of ``path``."""
    sat, rim = result["channels"]["t2 saturated share"], result["rims"]
    bands = "; ".join(f"outer {k.split()[1]} px: {m['map share on lesion-free pixels']:.1%} of the map on "
                      f"{m['area share of lesion-free pixels']:.1%} of the area" for k, m in rim.items() if k.startswith("band"))
    body = f"""## Restoration: why the pixel AP is low (`benchmarks/restoration_study.py`)

Validation set only (`brain-val`, {result['max_slices']} slices per case spread evenly, scored on each input's own grid
inside its foreground by the code `medcfx evaluate` uses); model `{result['model']}` ({result['size']} px, T2),
{result['steps']} DDPM steps, sampling seed 0. Machine: {result['machine']}, shared with other jobs; {result['seconds']} s.

{markdown(result)}
T2 voxels the model's input normalisation saturates (per-scan 99th percentile, clipped): {sat['lesion']:.1%} of the
lesion, {sat['other brain']:.2%} of the rest of the brain. Lesion-free map mass in the brain's outer band: {bands}.

Reproduce: `{command}`
"""
    write_section(path, "restoration-study", body)
    log(f"wrote the restoration-study section of {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/restoration-study"))
    ap.add_argument("--val", type=Path, default=Path("/work/demo-data/brain-val"))
    ap.add_argument("--model", default="restoration-fold0", help="the model whose maps the rim study reads")
    ap.add_argument("--variants", default="", help="name=REF;... trained variants (REF may be a,b,c: an ensemble) "
                    "scored on the validation set")
    ap.add_argument("--sizes", default="48,64,96,128")
    ap.add_argument("--max-slices", type=int, default=24)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--write-docs", type=Path, default=None)
    a = ap.parse_args()
    os.environ.update(MEDCFX_HOME=str(a.home), MEDCFX_CACHE=str(a.home / "cache"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rim, pre = rims(a.val, a.model, a.max_slices, a.steps)
    result = {"model": a.model, "size": pre["size"], "max_slices": a.max_slices, "steps": a.steps,
              "resolution": resolution_ceiling(a.val, pre, [int(s) for s in a.sizes.split(",")], a.max_slices),
              "channels": channel_maps(a.val, pre, a.max_slices), "rims": rim,
              "variants": variants(a.val, a.variants, a.max_slices, a.steps, a.work),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}",
              "seconds": round(time.time() - t0)}
    (a.work / "study.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(json.dumps({k: result[k] for k in ("rims", "channels")}, indent=1))
    if a.write_docs:
        shown = [f"--{k.replace('_', '-')} {v}" for k, v in (("model", a.model), ("sizes", a.sizes),
                                                             ("max_slices", a.max_slices), ("steps", a.steps))]
        write_docs(a.write_docs, result, "python benchmarks/restoration_study.py --home H --val VAL " + " ".join(shown)
                   + (f' --variants "{a.variants}"' if a.variants else "") + " --write-docs docs/benchmarks.md")


if __name__ == "__main__":
    main()
