"""``medcfx evaluate`` / ``predict``: the autoencoder's reconstruction quality (MAE, PSNR, SSIM) and the
joint model's classification (AUROC / AP per finding) with the counterfactual quality check of ``evaluate``
(quality.py on the first test images labelled for the target); ``medcfx calibrate``: operating points of
the difference maps of one target on validation images (boxes as lesions), stored with the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medcfx.diffusion import Schedule
from medcfx.errors import MedcfxError
from medcfx.provenance import record, write_json
from medcfx.staging import atomic_write_bytes

from medcfx_mediffusion import quality as cq
from medcfx_mediffusion.autoencoder import KLAutoencoder, ssim
from medcfx_mediffusion.config import CF_IMAGES
from medcfx_mediffusion.data import (
    default_model,
    eval_rows,
    expand_inputs,
    images_tensor,
    load_dataset,
    load_joint,
    read_input,
    stored_preprocess,
)
from medcfx_mediffusion.joint import classify
from medcfx_mediffusion.sampling import cf_settings, difference_map, run_counterfactual, to_unit


# ------------------------------------------------------------------------------------------ metrics


def recon_metrics(codec_ae: KLAutoencoder, x: torch.Tensor, batch: int = 64) -> dict:
    """Reconstruction quality of x -> D(mu(x)) in [0, 1] intensity units: MAE, PSNR (peak 1), SSIM."""
    maes, mses, ssims = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            rec, _, _ = codec_ae(xb)
            a, b = (xb + 1) / 2, (rec.clamp(-1, 1) + 1) / 2
            maes.append((a - b).abs().flatten(1).mean(1))
            mses.append((a - b).pow(2).flatten(1).mean(1))
            ssims.append(ssim(a, b, data_range=1.0))
    mae, mse, s = torch.cat(maes), torch.cat(mses), torch.cat(ssims)
    psnr = 10 * torch.log10(1.0 / mse.clamp(min=1e-12))
    return {"recon_MAE": float(mae.mean()), "recon_PSNR": float(psnr.mean()), "recon_SSIM": float(s.mean()),
            "images": int(len(x))}


def auroc_table(probs: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """AUROC and AP per finding over its labelled rows (NaN when a class is absent), and their means."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    out: dict = {}
    aucs, aps = [], []
    for k, name in enumerate(names):
        m = ~np.isnan(labels[:, k])
        y = labels[m, k].astype(int)
        if m.sum() == 0 or len(np.unique(y)) < 2:
            out[f"{name}_AUROC"] = float("nan")
            out[f"{name}_AP"] = float("nan")
            continue
        auc = float(roc_auc_score(y, probs[m, k]))
        ap = float(average_precision_score(y, probs[m, k]))
        out[f"{name}_AUROC"], out[f"{name}_AP"] = auc, ap
        aucs.append(auc)
        aps.append(ap)
    out["mean_AUROC"] = float(np.mean(aucs)) if aucs else float("nan")
    out["mean_AP"] = float(np.mean(aps)) if aps else float("nan")
    return out


# ------------------------------------------------------------------------------------------ autoencoder


def evaluate_autoencoder(request) -> dict:
    entry = request.registry.resolve(request.model or default_model(request.registry, ("mediffusion-ae", "mediffusion-ae-demo")))
    if entry.method != "mediffusion-ae":
        raise MedcfxError(f"--model {entry.ref} is a '{entry.method}' model, not a mediffusion-ae autoencoder")
    ae = KLAutoencoder(entry.config["network"])
    from medcfx.loading import load_state

    load_state(ae, request.registry.load_tensors(entry, "weights"), f"{entry.ref} (weights)")
    pp = stored_preprocess(entry.config["preprocess"])
    ss = load_dataset(request.data, pp)
    rows = eval_rows(ss)
    metrics = recon_metrics(ae.eval(), images_tensor(ss, rows))
    out = {"model": entry.ref, "data": str(request.data), **metrics}
    request.out.mkdir(parents=True, exist_ok=True)
    write_json(request.out / "metrics.json", out)
    write_json(request.out / "provenance.json", record(request, entry, {"rows": "test split" if len(rows) < len(ss) else "all"}))
    return out


# ------------------------------------------------------------------------------------------ joint model


def predict(request) -> dict:
    model, codec, entry = load_joint(request.registry, request.model, request.device)
    ccfg = entry.config["classifier"]
    pp = stored_preprocess(entry.config["preprocess"])
    paths = expand_inputs(request.inputs)
    rows = []
    for p in paths:
        x, _ = read_input(p, pp, int(entry.config["ae"]["network"]["in_channels"]), log=request.log)
        probs = classify(model, codec.encode(x.to(request.device)).cpu(), ccfg["kind"])[0]
        rows.append({"file": str(p), **{f: round(float(v), 6) for f, v in zip(ccfg["findings"], probs)}})
    from rich.table import Table

    table = Table(title=f"mediffusion {entry.ref}: probability per finding")
    table.add_column("file")
    for f in ccfg["findings"]:
        table.add_column(f, justify="right")
    for r in rows:
        table.add_row(Path(r["file"]).name, *(f"{r[f]:.3f}" for f in ccfg["findings"]))
    if request.console is not None:
        request.console.print(table)
    if request.out is not None:
        request.out.mkdir(parents=True, exist_ok=True)
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", *ccfg["findings"]])
        for r in rows:
            w.writerow([r["file"], *(r[f] for f in ccfg["findings"])])
        atomic_write_bytes(request.out / "predictions.csv", buf.getvalue().encode())
        write_json(request.out / "provenance.json", record(request, entry, {"t": 0}, paths, predictions=rows))
    return {"printed": True} if request.console is not None else {"model": entry.ref, "predictions": rows}


def evaluate(request) -> dict:
    model, codec, entry = load_joint(request.registry, request.model, request.device)
    ccfg = entry.config["classifier"]
    ss = load_dataset(request.data, stored_preprocess(entry.config["preprocess"]))
    findings = ccfg["findings"]
    missing = [f for f in findings if f not in ss.label_names]
    if missing:
        raise MedcfxError(f"--data {request.data}: no label column for {', '.join(missing)} (has: {', '.join(ss.label_names) or 'none'})")
    n_loc = int(request.options.get("localise_images") or 0)
    plan = _localisation_plan(request, entry, ss) if n_loc else None  # refused before any work
    rows = eval_rows(ss)
    labels = np.asarray(ss.labels)[rows][:, [ss.label_names.index(f) for f in findings]]
    z = codec.encode(images_tensor(ss, rows).to(request.device)).cpu()
    probs = classify(model, z, ccfg["kind"])
    metrics = auroc_table(probs, labels, findings)
    out = {"model": entry.ref, "data": str(request.data), "images": int(len(rows)), **metrics}
    n_cf = int(request.options.get("cf_images", CF_IMAGES))
    quality = _cf_quality(request, model, codec, entry, ss, rows, n_cf) if n_cf > 0 else None
    if quality is not None:
        out["counterfactual_quality"] = {**quality["settings"], **quality["summary"]}
    if plan is not None:
        out["localisation"] = _localise(request, model, codec, entry, ss, plan, n_loc)
    request.out.mkdir(parents=True, exist_ok=True)
    write_json(request.out / "metrics.json", out)
    if quality is not None:
        write_json(request.out / "counterfactual_quality.json", quality)
    lines = ["| finding | AUROC | AP |", "|---|---:|---:|"]
    for f in findings:
        lines.append(f"| {f} | {metrics[f + '_AUROC']:.4f} | {metrics[f + '_AP']:.4f} |")
    lines.append(f"| mean | {metrics['mean_AUROC']:.4f} | {metrics['mean_AP']:.4f} |")
    if quality is not None:
        lines += ["", _quality_text(out["counterfactual_quality"])]
    if plan is not None:
        lines += ["", f"Localisation of {', '.join(plan['targets'])} (difference maps against the boxes, "
                      f"calibrated thresholds): localisation/metrics.md"]
    (request.out / "metrics.md").write_text("\n".join(lines) + "\n")
    write_json(request.out / "provenance.json", record(request, entry, {"rows": len(rows), "cf_images": n_cf}, []))
    if quality is not None:
        request.log(_quality_text(out["counterfactual_quality"]))
    return out


def _cf_quality(request, model, codec, entry, ss, rows, n: int) -> dict:
    """Counterfactuals of at most ``n`` test images (the first rows labelled on the targets' starting
    side: positive for a removal, negative for an addition), each with its inversion self-check, flip
    and off-target change (quality.py); per case and summarised."""
    c = entry.config
    findings, kind = c["classifier"]["findings"], c["classifier"]["kind"]
    o = request.options
    schedule = Schedule.create(c["diffusion"]["schedule"], int(c["diffusion"]["T"]))
    spec = o.get("cf_target") or [f"no-{findings[0]}"]
    targets, t, scales, steps, sampler = cf_settings(spec, findings, request.config["explain"], schedule)
    limit = float(o.get("inversion_limit") or cq.INVERSION_LIMIT)
    lab = np.asarray(ss.labels)
    cols = [ss.label_names.index(tg.finding) for tg in targets]
    eligible = [int(r) for r in rows if all(lab[r, k] == (0.0 if tg.add else 1.0) for k, tg in zip(cols, targets))]
    chosen = eligible[:n]
    boxes = ss.bbox or {}
    masks, has_mask = ss.masks, (ss.has_mask if ss.masks is not None else None)
    request.log(f"counterfactual quality: {','.join(tg.name for tg in targets)} on {len(chosen)} of the "
                f"{len(eligible)} test images labelled for it (t={t}, steps {steps}, {sampler}; two reverse "
                f"chains per image)")
    cases = []
    for r in chosen:
        x = images_tensor(ss, np.array([r])).to(request.device)
        x_cf, x_ae, x_inv, z0 = run_counterfactual(model, codec, schedule, x, kind, targets, scales, t, steps,
                                                   sampler, int(request.seed))
        before = classify(model, z0.cpu(), kind)[0]
        after = classify(model, codec.encode(x_cf.clamp(-1, 1).to(request.device)).cpu(), kind)[0]
        u_in = to_unit(x[0].cpu())
        diff = difference_map(x[0], x_cf[0])
        region = box_lesion(boxes, r, [tg.finding for tg in targets], diff.shape)
        source = "box" if region is not None else None
        if region is None and masks is not None and bool(has_mask[r]):
            region, source = np.asarray(masks[r]) > 0, "mask"
        inversion = cq.inversion_check(u_in, to_unit(x_inv[0]), limit)
        inversion["autoencoder_error"] = float(np.abs(to_unit(x_ae[0]) - u_in).mean())
        q = cq.case_quality(findings, targets, before, after, inversion, diff, region, source)
        cases.append({"case": str(ss.case_ids[r]), "probabilities": {
            f: {"before": float(b), "after": float(a)} for f, b, a in zip(findings, before, after)}, **q})
        request.log(f"  {ss.case_ids[r]}: {cq.case_line(q)}")
    settings = {"targets": [tg.name for tg in targets], "t": t, "scales": scales, "steps": steps,
                "sampler": sampler, "seed": int(request.seed), "eligible_images": len(eligible),
                "selection": "the first test rows labelled positive for each removed finding and negative for "
                             "each added one"}
    return {"settings": settings, "summary": cq.summarise(cases), "cases": cases}


def box_lesion(boxes: dict, row: int, names, shape, geom=None) -> np.ndarray | None:
    """The union of row ``row``'s boxes of the findings ``names`` (``boxes``: a SliceSet's ``bbox``, finding
    -> [N, 4] model coordinates) as a bool mask of ``shape``: on the model grid, or on the input's own grid
    when ``geom`` (the row's SliceGeometry) is given; None when none of them has a box."""
    found = [boxes[f][row] for f in names if f in boxes]
    if geom is not None:
        found = [geom.box_to_original(b) for b in found if np.isfinite(np.asarray(b, np.float64)).all()]
    return cq.box_region(found, shape)


def check_target_labels(request, ss, targets) -> None:
    """UsageError (before any work) for an addition target (its difference map has no box to be scored
    against: the boxes mark where a finding IS) or when --data has no label column for a target's finding."""
    from medcfx.errors import UsageError

    adds = [tg.name for tg in targets if tg.add]
    if adds:
        raise UsageError(f"--target {','.join(adds)}: only removal targets (no-<finding>) have a lesion to score "
                         f"the difference map against (the finding's box); an addition has none")
    missing = [tg.finding for tg in targets if tg.finding not in ss.label_names]
    if missing:
        raise UsageError(f"--data {request.data}: no label column for {', '.join(missing)} (has: "
                         f"{', '.join(ss.label_names) or 'none'}); the difference maps are scored against the "
                         f"target's labels and boxes")


def target_maps(request, model, codec, schedule, kind: str, ss, targets, t: int, scales, steps, sampler: str,
                seed: int, cap: int, stats: dict):
    """Yield (image id, difference map [H, W] float32 on the image's own grid, lesion bool [H, W], positive)
    for the images of ``ss`` in order, at most ``cap`` (0: all): the counterfactual of ``targets`` with the
    given settings (explain's code, no self-check); lesion = the union of the target findings' boxes of an
    image positive for one of them, nothing for an image negative for all. Images positive without a box
    are skipped, unlabelled ones too unless ``request.extra["healthy"]`` (then negative). ``stats`` gets the
    counts ``images``, ``positive``, ``no_box``, ``unlabelled``. Check the labels first
    (:func:`check_target_labels`)."""
    names = [tg.finding for tg in targets]
    lab = np.asarray(ss.labels)[:, [ss.label_names.index(f) for f in names]]
    healthy = bool(request.extra.get("healthy"))
    boxes = ss.bbox or {}
    stats.update(images=0, positive=0, no_box=0, unlabelled=0)
    for r in range(len(ss)):
        if cap and stats["images"] >= cap:
            break
        row = lab[r]
        if np.isnan(row).any() and not healthy:
            stats["unlabelled"] += 1
            continue
        pos = [f for f, v in zip(names, row) if v == 1.0]
        geom = ss.geometry(str(ss.case_ids[r]))
        shape = tuple(int(s) for s in geom.shape[:2])
        lesion = np.zeros(shape, bool)
        if pos:
            have = [f for f in pos if f in boxes and np.isfinite(np.asarray(boxes[f][r], np.float64)).all()]
            if len(have) < len(pos):
                stats["no_box"] += 1
                continue
            lesion = box_lesion(boxes, r, pos, shape, geom)
            stats["positive"] += 1
        x = images_tensor(ss, np.array([r])).to(request.device)
        x_cf = run_counterfactual(model, codec, schedule, x, kind, targets, scales, t, steps, sampler, seed,
                                  self_check=False)[0]
        stats["images"] += 1
        yield str(ss.case_ids[r]), geom.to_original(difference_map(x[0], x_cf[0])[None]), lesion, bool(pos)


def calibrate(request) -> dict:
    """``medcfx calibrate REF --data VAL --target T``: the difference maps of the counterfactuals for T (the
    explain settings, seed and code) of at most ``--cf-images`` validation images, on each image's own grid,
    streamed into a 22-bit PixelMetrics: lesion = the union of the target findings' boxes of an image
    positive for one of them, every other pixel healthy (all pixels of an image negative for them). Images
    positive without a box are skipped, unlabelled ones too unless ``--healthy``. The operating points
    (:func:`medcfx.operating_points.calibrate`) are stored as a new version of the model with the settings
    (``calibration``, ``calibration_settings``)."""
    from medcfx.metrics import PixelMetrics
    from medcfx.operating_points import calibrate as operating_points
    from medcfx.train import data_fingerprint

    model, codec, entry = load_joint(request.registry, request.model, request.device)
    c, o = entry.config, request.options
    findings, kind = c["classifier"]["findings"], c["classifier"]["kind"]
    schedule = Schedule.create(c["diffusion"]["schedule"], int(c["diffusion"]["T"]))
    targets, t, scales, steps, sampler = cf_settings(o.get("target"), findings, request.config["explain"], schedule,
                                                     o.get("t"), o.get("scale"), o.get("steps"), o.get("sampler"))
    ss = load_dataset(request.data, stored_preprocess(c["preprocess"]))
    names = [tg.finding for tg in targets]
    check_target_labels(request, ss, targets)
    stats = {}
    pm = PixelMetrics(bits=22)
    for _, diff, lesion, _ in target_maps(request, model, codec, schedule, kind, ss, targets, t, scales, steps,
                                          sampler, int(request.seed), int(o.get("cf_images") or 0), stats):
        pm.update(diff, lesion)
    used, positive, no_box, unlabelled = (stats[k] for k in ("images", "positive", "no_box", "unlabelled"))
    if used == 0:
        raise MedcfxError(f"--data {request.data}: no validation image to calibrate on ({no_box} positive for "
                          f"{','.join(names)} without a box, {unlabelled} unlabelled for it)")
    if pm.neg.sum() == 0:
        raise MedcfxError("the validation images hold no healthy pixel: the false-positive rate is undefined")
    cal = operating_points(pm, method="mediffusion", data_fingerprint=data_fingerprint(request.data), n_cases=used,
                           fpr=float(request.extra.get("fpr") or 0.05))
    settings = {"targets": [tg.name for tg in targets], "t": t, "scales": scales, "steps": steps, "sampler": sampler,
                "seed": int(request.seed), "map": "|counterfactual - input| channel mean on the input's grid",
                "lesion": "union of the target findings' boxes", "images": used, "positive_images": positive,
                "skipped_positive_without_box": no_box, "skipped_unlabelled": unlabelled}
    new = request.registry.derive(entry.ref, {"calibration": cal.to_dict(), "calibration_settings": settings})
    named = ", ".join(f"{k} > {v:.6g}" for k, v in cal.thresholds().items())
    best = f"; best validation Dice {cal.best_dice:.3f}" if cal.best_dice is not None else ""
    request.log(f"calibrated {entry.ref} for {','.join(settings['targets'])} on {used} image(s) of {request.data} "
                f"({positive} with a box; skipped {no_box} positive without a box, {unlabelled} unlabelled): "
                f"{named} (achieved FPR {cal.achieved_fpr:.4f}{best}) -> {new.ref}")
    return {"printed": request.console is not None, "model": new.ref, "calibration": cal.to_dict(),
            "calibration_settings": settings}


def _localisation_plan(request, entry, ss) -> dict:
    """The target and sampling settings of ``evaluate --localise-images``: those the model was calibrated
    with (``medcfx calibrate``), so the test maps are thresholded at thresholds of maps made the same way.
    UsageError without a calibration or without the target's labels in --data."""
    from medcfx.errors import UsageError
    from medcfx.scoring import calibration_of
    from medcfx_mediffusion import counterfactual as cf

    stored = calibration_of(entry)
    if stored is None:
        raise UsageError(f"--localise-images: {entry.ref} has no calibration; run `medcfx calibrate {entry.ref} "
                         f"--data VALIDATION/ --target T` first (the maps are scored at its thresholds, with its "
                         f"target and settings)")
    s = entry.extra["calibration_settings"]
    targets = cf.parse_targets(s["targets"], entry.config["classifier"]["findings"])
    check_target_labels(request, ss, targets)
    return {"calibration": stored[0], "targets": [tg.name for tg in targets], "parsed": targets,
            **{k: s[k] for k in ("t", "scales", "steps", "sampler", "seed")}}


def _localise(request, model, codec, entry, ss, plan: dict, n: int) -> dict:
    """``evaluate --localise-images N``: the difference maps of the calibrated target for at most N test
    images (first rows; positives with the target's boxes, negatives; as ``calibrate`` picks them), scored on
    each image's own grid against the boxes with the field's metric set and case (= image) bootstrap
    intervals (:func:`medcfx.evaluation.report`, written to ``OUT/localisation/``); image score = the
    largest difference, label = positive for the target's findings."""
    import copy

    from medcfx.case_metrics import CaseMetrics
    from medcfx.evaluation import report

    c = entry.config
    schedule = Schedule.create(c["diffusion"]["schedule"], int(c["diffusion"]["T"]))
    cm, stats = CaseMetrics(plan["calibration"].thresholds()), {}
    request.log(f"localisation of {', '.join(plan['targets'])} on at most {n} test image(s) with the calibration's "
                f"settings (t {plan['t']}, scales {plan['scales']}, steps {plan['steps']}, {plan['sampler']}, seed "
                f"{plan['seed']}), not explain's")
    for image, diff, lesion, positive in target_maps(request, model, codec, schedule, c["classifier"]["kind"], ss,
                                                     plan["parsed"], plan["t"], plan["scales"], plan["steps"],
                                                     plan["sampler"], int(plan["seed"]), n, stats):
        cm.update(image, diff, lesion)
        cm.add_images(image, [float(diff.max())], [positive])
    if stats["positive"] == 0:
        raise MedcfxError(f"--data {request.data}: none of the {stats['images']} test image(s) localised holds "
                          f"{', '.join(plan['targets'])}'s finding with a box ({stats['no_box']} positive without a "
                          f"box, {stats['unlabelled']} unlabelled): pixel AP and Dice are undefined; give more "
                          f"--localise-images or annotated data")
    if stats["images"] < n:
        request.log(f"localisation: {stats['images']} usable test image(s), fewer than --localise-images {n}")
    sub = copy.copy(request)
    sub.out = request.out / "localisation"
    context = {"targets": plan["targets"], **{k: plan[k] for k in ("t", "scales", "steps", "sampler", "seed")},
               "map": "|counterfactual - input| channel mean on the input's grid",
               "lesion": "union of the target findings' boxes", "image_score": "largest difference",
               "calibration": {"source": entry.ref, **plan["calibration"].to_dict()},
               "images": stats["images"], "positive_images": stats["positive"],
               "skipped_positive_without_box": stats["no_box"], "skipped_unlabelled": stats["unlabelled"]}
    values = report(sub, "mediffusion", entry.ref, cm, context, request.extra.get("n_resamples"))
    return {"folder": str(sub.out), **{k: v for k, v in values.items() if k != "printed"}}


def _quality_text(q: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (f"Counterfactual quality ({', '.join(q['targets'])}, {q['cases']} test images): inversion self-check "
            f"error mean {f(q['inversion_error_mean'], '.4f')}, median {f(q['inversion_error_median'], '.4f')}, "
            f"flagged {q['flagged']} of {q['inversion_checked']} (limit {f(q['inversion_limit'], 'g')}); flip rate "
            f"{f(q['flip_rate'], '.2f')} over {q['flip_counted']}; off-target probability change "
            f"{f(q['off_target_probability_change_mean'], '.3f')}; off-target image change "
            f"{f(q['off_target_image_change_mean'], '.4f')} ({q['off_target_image_cases']} with a box or mask).")
