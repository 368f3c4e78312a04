"""``medcfx explain`` and ``medcfx sample`` of ``mediffusion``: counterfactuals guided by the model's own
classifier (forward noising of the latent to t, guided reverse chain, decoded; with the unguided inversion
self-check) and guided generation from noise; the PNG panels they write. With a model calibrated for the explained
target (``medcfx calibrate``, scoring.py) ``explain`` also thresholds the difference map: mask.png, its
connected components, the area and the decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medcfx import viz
from medcfx.diffusion import Schedule
from medcfx.errors import UsageError
from medcfx.inputs import CaseLog, OutputDir
from medcfx.operating_points import lesion_mask, lesion_size
from medcfx.provenance import record, write_json
from medcfx.staging import staged_folder

from medcfx_mediffusion import counterfactual as cf
from medcfx_mediffusion import quality as cq
from medcfx_mediffusion.data import expand_inputs, load_joint, read_input, stored_preprocess
from medcfx_mediffusion.joint import classify


def cf_settings(target_spec, findings: list[str], ecfg: dict, schedule, t=None, scale=None, steps=None,
                sampler=None):
    """(targets, t, scales, steps, sampler) of a counterfactual: the given values, else the ``explain``
    config's (t: t_remove when any target is a removal, else t_add; scale per target by its direction);
    t / steps / sampler are checked before any work."""
    targets = cf.parse_targets(target_spec, findings)
    removing = any(not tg.add for tg in targets)
    t = int(t) if t is not None else int(ecfg["t_remove"] if removing else ecfg["t_add"])
    scales = [float(scale) if scale is not None else float(ecfg["scale_add"] if tg.add else ecfg["scale_remove"])
              for tg in targets]
    steps = steps if steps is not None else ecfg["steps"]
    sampler = sampler or ecfg["sampler"]
    cf.chain(schedule, t, steps)  # check t / steps before any work
    if sampler not in ("ddpm", "ddim"):
        raise UsageError(f"--sampler must be ddpm or ddim, got {sampler!r}")
    return targets, t, scales, steps, sampler


def run_counterfactual(model, codec, schedule, x: torch.Tensor, kind: str, targets, scales, t: int, steps,
                       sampler: str, seed: int, self_check: bool = True):
    """(x_cf, x_ae, x_inv, z0) for images x [B, C, S, S] in [-1, 1] on the model's device: x_cf the decoded
    guided counterfactual, x_ae = D(E(x)) and x_inv the inversion self-check, i.e. the same forward noising
    and the same reverse chain with guidance scale 0, drawn from a fresh generator with the same seed (so
    the same noise throughout), decoded (None without ``self_check``); images on the CPU."""
    z0 = codec.encode(x)
    z_cf = cf.counterfactual(model, schedule, z0, kind, targets, scales, t, steps, sampler,
                             torch.Generator().manual_seed(int(seed)))
    x_inv = None
    if self_check:
        z_inv = cf.counterfactual(model, schedule, z0, kind, targets, [0.0] * len(targets), t, steps, sampler,
                                  torch.Generator().manual_seed(int(seed)))
        x_inv = codec.decode(z_inv).cpu()
    return codec.decode(z_cf).cpu(), codec.decode(z0).cpu(), x_inv, z0


def difference_map(x: torch.Tensor, x_cf: torch.Tensor) -> np.ndarray:
    """The map explain writes (on the model grid): |counterfactual - input| in [0, 1] intensity units, mean
    over the channels; ``x`` and ``x_cf`` one image [C, S, S] in [-1, 1]. float32 [S, S]."""
    return np.abs(to_unit(x_cf.cpu()) - to_unit(x.cpu())).mean(axis=0).astype(np.float32)


def explain_operating_point(request, entry, params: dict) -> tuple[tuple[str, float] | None, dict]:
    """(name, threshold) of the calibration stored with ``entry`` and what the summary says once
    (:func:`medcfx.scoring.operating_point`); None and a warning when the calibration was made for other
    targets than ``params["targets"]`` (a threshold belongs to the maps of its target)."""
    from medcfx.scoring import operating_point

    point, said = operating_point(request, entry, {k: v for k, v in params.items() if k != "targets"},
                                  "mediffusion")
    saved = ((entry.extra or {}).get("calibration_settings") or {}).get("targets")
    if point is not None and saved is not None and list(saved) != list(params["targets"]):
        said = {"calibration": f"{entry.ref} is calibrated for target {','.join(saved)}, not "
                               f"{','.join(params['targets'])}: no mask or decision"}
        said["warning"] = (f"{entry.ref}'s calibration was made for target {','.join(saved)}; explaining "
                           f"{','.join(params['targets'])} gives the heatmap only (calibrate for this target)")
        return None, said
    return point, said


def dicom_pixel_spacing(path) -> tuple[float, float] | None:
    """(row, column) spacing in mm of a DICOM image (PixelSpacing), None for other files or without it."""
    from medcfx.data.io import is_dicom_file

    if not is_dicom_file(Path(path)):
        return None
    try:
        import pydicom

        sp = pydicom.dcmread(str(path), stop_before_pixels=True).get("PixelSpacing")
        out = (float(sp[0]), float(sp[1])) if sp is not None and len(sp) == 2 else None
    except Exception:  # an unreadable header: the area is given in pixels
        return None
    return out if out is not None and all(np.isfinite(out)) and min(out) > 0 else None


def decide_image(heat: np.ndarray, point: tuple[str, float], targets, spacing=None) -> tuple[np.ndarray, dict]:
    """The difference map on the input's grid at a calibrated threshold: (mask bool [H, W], the decision
    record): ``score > threshold``, connected components with 8 neighbours, the area in pixels (mm^2 with a
    pixel ``spacing``), the image score (the map's maximum) and "lesion present" when a component remains."""
    name, threshold = point
    lm = lesion_mask(heat, threshold)
    size, unit = lesion_size(lm.mask, spacing)
    removal = all(not tg.add for tg in targets)
    return lm.mask, {"operating_point": name, "threshold": float(threshold), "rule": "score > threshold",
                     "decision": "lesion present" if lm.n_components else "no lesion",
                     "image_score": float(heat.max()), "n_components": lm.n_components,
                     f"lesion_size_{unit.replace('^', '')}": float(size),
                     "component_sizes_pixels": [int(s) for s in lm.sizes],
                     "flagged_region": "where the finding was (removal target)" if removal else
                                       "where the counterfactual changed the image (addition target)"}


# ------------------------------------------------------------------------------------------ explain


def explain(request) -> dict:
    model, codec, entry = load_joint(request.registry, request.model, request.device)
    c = entry.config
    ccfg, ecfg = c["classifier"], request.config["explain"]
    findings = ccfg["findings"]
    o = request.options
    schedule = Schedule.create(c["diffusion"]["schedule"], int(c["diffusion"]["T"]))
    targets, t, scales, steps, sampler = cf_settings(o["target"], findings, ecfg, schedule, o["t"], o["scale"],
                                                     o["steps"], o["sampler"])
    pp = stored_preprocess(c["preprocess"])
    channels = int(c["ae"]["network"]["in_channels"])
    paths = expand_inputs(request.inputs)
    out = Path(request.out)
    self_check = bool(o.get("self_check", True))
    limit = float(o.get("inversion_limit") or cq.INVERSION_LIMIT)
    params = {"targets": [tg.name for tg in targets], "t": t, "scales": scales, "steps": steps, "sampler": sampler,
              "noising": "forward q_sample to t", "guidance": "eps - sqrt(1-abar_t) * grad sum_j s_j log p_j",
              "diff": "|counterfactual - input| (intensity in [0, 1], channel mean)",
              "self_check": ("the same noising and reverse chain with guidance scale 0 (same seed), decoded; "
                             f"error = mean |input - reconstruction| in [0, 1], flagged above {limit:g}")
              if self_check else "off"}
    point, said = explain_operating_point(request, entry, params)
    for k in ("calibration", "warning"):
        if k in said:
            request.log(f"{k}: {said[k]}")
    results = []
    used: set[str] = set()
    log = CaseLog()  # an image that cannot be read is reported at the end; the others go on
    for path in paths:
        name = _unique(Path(path).stem, used)
        with log.case(str(path), Path(path).name):
            x, geom = read_input(path, pp, channels, log=request.log)
            results.append(_explain_one(request, entry, model, codec, schedule, path, x, geom, out / name,
                                             targets, scales, t, steps, sampler, params,
                                             limit if self_check else None, point, said))
    if self_check and results:
        n_flag = sum(bool(r["quality"]["inversion"]["flagged"]) for r in results)
        request.log(f"self-check: {n_flag} of {len(results)} case(s) flagged (unguided reconstruction error "
                    f"above {limit:g})")
    return log.finish({"printed": True} if request.console is not None
                      else {"model": entry.ref, "outputs": results, **said})


def _explain_one(request, entry, model, codec, schedule, path, x, geom, final: Path, targets, scales,
                 t, steps, sampler, params, limit, point=None, said=None) -> dict:
    findings, kind = entry.config["classifier"]["findings"], entry.config["classifier"]["kind"]
    x = x.to(request.device)
    x_cf, x_rec, x_inv, z0 = run_counterfactual(model, codec, schedule, x, kind, targets, scales, t, steps,
                                                sampler, int(request.seed), self_check=limit is not None)
    before = classify(model, z0.cpu(), kind)[0]
    after = classify(model, codec.encode(x_cf.clamp(-1, 1).to(request.device)).cpu(), kind)[0]
    u_in, u_cf, u_rec = to_unit(x[0].cpu()), to_unit(x_cf[0]), to_unit(x_rec[0])
    diff = difference_map(x[0], x_cf[0])
    inversion = None
    if x_inv is not None:
        inversion = cq.inversion_check(u_in, to_unit(x_inv[0]), limit)
        inversion["autoencoder_error"] = float(np.abs(u_rec - u_in).mean())
    quality = cq.case_quality(findings, targets, before, after, inversion)
    with OutputDir(final.parent, final.name) as folder:
        viz.save_png(_gray_u8(geom.to_original(u_cf[None])), folder / "counterfactual.png")
        orig_diff = geom.to_original(diff[None])
        viz.save_png(viz.heat_rgb(orig_diff, vmax=max(float(diff.max()), 1e-6)), folder / "heatmap.png")
        decision = None
        if point is not None:
            mask, decision = decide_image(orig_diff, point, targets, dicom_pixel_spacing(path))
            viz.save_png((mask * 255).astype(np.uint8), folder / "mask.png")
        tiles = [_gray_u8(u_in), _gray_u8(u_rec), _gray_u8(u_cf), viz.heat_rgb(diff), viz.overlay(_gray_u8(u_in), diff)]
        titles = ["input", "AE recon", "counterfactual", f"|diff| max {diff.max():.2f}", "overlay"]
        if decision is not None:  # the mask's outline on the input (the threshold at the panel's model size)
            tiles.append(viz.outline(_gray_u8(u_in), diff > decision["threshold"]))
            titles.append(f"mask ({decision['operating_point']})")
        lines = [f"target {','.join(tg.name for tg in targets)}  t={t}  scale={','.join(f'{s:g}' for s in scales)}",
                 "probability before -> after:", *_titles_text(findings, before, after)]
        if decision is not None:
            lines.append(f"{decision['operating_point']} (> {decision['threshold']:.4g}): {decision['decision']}, "
                         f"{decision['n_components']} component(s)")
        if inversion is not None:
            lines.append(f"self-check |x - unguided rec| {inversion['error']:.3f} (limit {inversion['limit']:g})"
                         + (": MAP NOT TRUSTWORTHY" if inversion["flagged"] else ": ok"))
        viz.save_png(_with_text(viz.panel(tiles, titles, scale=3), lines), folder / "panel.png")
        probs = {f: {"before": float(b), "after": float(a)} for f, b, a in zip(findings, before, after)}
        write_json(folder / "provenance.json", record(request, entry, params, [path], probabilities=probs,
                                                     diff_max=float(diff.max()), diff_mean=float(diff.mean()),
                                                     quality=quality, decision=decision,
                                                     **(said or {})))
    request.log(f"{path}: " + ", ".join(f"{f} {b:.2f}->{a:.2f}" for f, b, a in zip(findings, before, after))
                + f"; {cq.case_line(quality)}  -> {final}")
    if inversion is not None and inversion["flagged"]:
        request.log(cq.warning_text(path, inversion))
    if decision is not None:
        size = next(k for k in decision if k.startswith("lesion_size_"))
        request.log(f"{path}: {decision['operating_point']} > {decision['threshold']:.4g}: {decision['decision']} "
                    f"({decision['n_components']} component(s), {size[12:]} {decision[size]:g}, image score "
                    f"{decision['image_score']:.4f})")
    out = {"input": str(path), "folder": str(final), "probabilities": probs, "quality": quality}
    if decision is not None:
        out["decision"] = decision
    return out


# ------------------------------------------------------------------------------------------ sample


def sample(request) -> dict:
    model, codec, entry = load_joint(request.registry, request.model, request.device)
    c = entry.config
    ccfg, scfg = c["classifier"], request.config["sample"]
    findings, kind = ccfg["findings"], ccfg["kind"]
    o = request.options
    targets = cf.parse_targets(o["target"], findings) if o["target"] else []
    scale = float(o["scale"]) if o["scale"] is not None else float(scfg["scale"])
    scales = [scale] * len(targets)
    steps = o["steps"] if o["steps"] is not None else scfg["steps"]
    sampler = o["sampler"] or scfg["sampler"]
    schedule = Schedule.create(c["diffusion"]["schedule"], int(c["diffusion"]["T"]))
    grid = cf.chain(schedule, schedule.T - 1, steps)
    n = int(request.extra["n"])
    zc, h = int(c["network"]["in_channels"]), int(c["network"]["image_size"])
    g = torch.Generator().manual_seed(int(request.seed))
    den = cf.guided_denoiser(model, schedule, kind, targets, scales)
    images, probs = [], []
    for i in range(0, n, 16):
        b = min(16, n - i)
        z_T = torch.randn((b, zc, h, h), generator=g)
        z0 = cf.reverse(den, z_T.to(request.device), grid, sampler, g)
        x = codec.decode(z0).cpu().clamp(-1, 1)
        probs.append(classify(model, codec.encode(x.to(request.device)).cpu(), kind))
        images.append(x)
    x = torch.cat(images)
    p = np.concatenate(probs)
    out = Path(request.out)
    with staged_folder(out) as folder:
        tiles = [_gray_u8(to_unit(xi)) for xi in x]
        per_row = int(np.ceil(np.sqrt(n)))
        rows = [tiles[r:r + per_row] for r in range(0, n, per_row)]
        titles = [[" ".join(f"{pi[k]:.2f}" for k in range(len(findings))) for pi in p[r:r + per_row]] for r in range(0, n, per_row)]
        viz.save_png(viz.grid(rows, titles, scale=2), folder / "samples.png")
        for j, tile in enumerate(tiles):
            viz.save_png(tile, folder / f"sample_{j:03d}.png")
        params = {"targets": [tg.name for tg in targets], "scale": scale, "steps": steps, "sampler": sampler,
                  "n": n, "grid titles": "probabilities in the order " + ", ".join(findings)}
        write_json(folder / "provenance.json", record(request, entry, params, [], probabilities=[
            {f: float(v) for f, v in zip(findings, pi)} for pi in p]))
    mean = {f: float(p[:, k].mean()) for k, f in enumerate(findings)}
    request.log(f"wrote {n} samples to {out} (mean probability: " + ", ".join(f"{f} {v:.2f}" for f, v in mean.items()) + ")")
    return {"model": entry.ref, "out": str(out), "mean_probability": mean, "printed": request.console is not None}


# ------------------------------------------------------------------------------------------ pictures


def _unique(stem: str, used: set[str]) -> str:
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name


def _titles_text(findings, before, after) -> list[str]:
    return [f"{f}: {b:.2f} -> {a:.2f}" for f, b, a in zip(findings, before, after)]


def _with_text(img, lines: list[str]):
    """The panel image with lines of text below it (white on black)."""
    from PIL import Image, ImageDraw

    h = 14 * len(lines) + 8
    canvas = Image.new("RGB", (img.width, img.height + h), (0, 0, 0))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, img.height + 4 + 14 * i), line, fill=(255, 255, 255))
    return canvas


def to_unit(x: torch.Tensor) -> np.ndarray:
    """[C, S, S] model image in [-1, 1] -> [C, S, S] in [0, 1]."""
    return ((x.clamp(-1, 1) + 1) / 2).numpy()


def _gray_u8(u: np.ndarray) -> np.ndarray:
    a = u[0] if u.shape[0] == 1 else np.moveaxis(u, 0, -1)
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
