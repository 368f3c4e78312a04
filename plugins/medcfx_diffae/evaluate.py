"""``medcfx evaluate diffae --model REF --data test/``: detection, grading and reconstruction, next to a
supervised CNN trained on the same labels inside the evaluation.

Rows of the test set follow the grader's label rules (``binary_targets``): detection uses the rows with a
binary target, grading the rows with a grade.

    detection AUROC   roc_auc_score(target, score)      score = signed distance d (grader), logit (CNN)
    detection F1      f1_score(target, score > 0)       the decision boundary d = 0 / logit = 0
    grading macro-F1  f1_score(grade, rounded prediction, average="macro", labels = the grade range)
    grading MAE       mean |rounded prediction - grade|
    reconstruction    mean MSE / MAE / PSNR of decode(encode(x)) over the first ``--recon-images`` images
    counterfactual    on the same images (quality.py; per image in counterfactual_quality.json): the inversion
    quality           self-check (mean |x - decode(encode(x))| in [0, 1], flagged above --inversion-limit),
                      the flip of the reflection (its decoded image re-encoded and scored) and the change
                      outside the lesion mask / box where the data carry one

The CNN baseline (Atad et al. use DenseNet121 "trained from scratch with the same data pipeline"; here a
small 4-stage CNN, sized for a CPU) has two heads trained jointly for ``--baseline-steps`` steps with Adam:
a binary logit (BCE on class-balanced batches of the rows with a binary target) and a grade regression
(MSE on batches of the graded rows). It trains on the grader's training data (``--train-data``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medcfx.errors import MedcfxError, UsageError
from medcfx.staging import atomic_write_bytes

from medcfx_diffae import quality as cq
from medcfx_diffae.common import inversion_limit, recon_errors, sampling_steps
from medcfx_diffae.grader import binary_targets, label_column, load_grader
from medcfx_diffae.model import GRADER_METHOD, METHOD, load_autoencoder, semantic


def detection_metrics(target, score) -> dict:
    from sklearn.metrics import f1_score, roc_auc_score

    t = np.asarray(target)
    ok = np.isfinite(t)
    t, s = t[ok].astype(int), np.asarray(score, np.float64)[ok]
    if len(np.unique(t)) < 2:
        return {"detection_AUROC": math.nan, "detection_F1": math.nan, "detection_n": int(len(t))}
    return {"detection_AUROC": float(roc_auc_score(t, s)),
            "detection_F1": float(f1_score(t, (s > 0).astype(int), zero_division=0)),
            "detection_n": int(len(t)), "detection_positive": int(t.sum())}


def grading_metrics(grade, predicted, grade_range) -> dict:
    from sklearn.metrics import f1_score

    g = np.asarray(grade, np.float64)
    ok = np.isfinite(g)
    if not ok.any():
        return {"grading_macro_F1": math.nan, "grading_MAE": math.nan, "grading_n": 0}
    lo, hi = grade_range
    t = g[ok].astype(int)
    p = np.clip(np.round(np.asarray(predicted, np.float64)[ok]), lo, hi).astype(int)
    return {"grading_macro_F1": float(f1_score(t, p, labels=list(range(lo, hi + 1)), average="macro",
                                              zero_division=0)),
            "grading_MAE": float(np.mean(np.abs(p - t))), "grading_n": int(ok.sum())}


# ---------------------------------------------------------------------------------------------------------
# the CNN baseline


def make_cnn(channels: int):
    from torch import nn

    layers, cin = [], channels
    for cout in (16, 32, 64, 64):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                   nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.AvgPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 2))


def train_cnn(images, target, grades, steps: int, seed: int = 0, batch: int = 32, lr: float = 1e-3):
    """Train the two-head CNN; returns the model (eval mode). images [N, C, S, S] tensor in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = make_cnn(images.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    t = np.asarray(target, np.float64)
    pos = torch.from_numpy(np.flatnonzero(t == 1))
    neg = torch.from_numpy(np.flatnonzero(t == 0))
    gr = np.asarray(grades, np.float64)
    graded = torch.from_numpy(np.flatnonzero(np.isfinite(gr)))
    gr_t = torch.from_numpy(np.nan_to_num(gr)).float()
    if len(pos) == 0 or len(neg) == 0:
        raise MedcfxError("CNN baseline: the training data has no positive or no negative sample")
    net.train()
    for _ in range(int(steps)):
        half = batch // 2
        idx = torch.cat([pos[torch.randint(len(pos), (half,), generator=g)],
                         neg[torch.randint(len(neg), (batch - half,), generator=g)]])
        y = torch.cat([torch.ones(half), torch.zeros(batch - half)])
        loss = F.binary_cross_entropy_with_logits(net(images[idx])[:, 0], y)
        if len(graded):
            gi = graded[torch.randint(len(graded), (batch // 2,), generator=g)]
            loss = loss + F.mse_loss(net(images[gi])[:, 1], gr_t[gi])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def cnn_predict(net, images, batch: int = 128):
    import torch

    with torch.no_grad():
        out = torch.cat([net(images[i:i + batch]) for i in range(0, len(images), batch)])
    return out[:, 0].numpy().astype(np.float64), out[:, 1].numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------------------


def _resolve(registry, model_ref: str | None, grader_opt: str):
    if not model_ref:
        raise UsageError("evaluate diffae needs --model (an autoencoder or a grader)")
    entry = registry.resolve(model_ref)
    if entry.method == GRADER_METHOD:
        return entry.parent, entry.ref
    if entry.method != METHOD:
        raise UsageError(f"model {entry.ref} is a '{entry.method}' model, not a diffae autoencoder or grader")
    if grader_opt:
        return entry.ref, grader_opt
    children = [e for e in registry.entries() if e.method == GRADER_METHOD and e.parent == entry.ref]
    if not children:
        raise UsageError(f"no grader belongs to {entry.ref}: train one with `medcfx train {GRADER_METHOD} "
                         f"--model {entry.ref} --data LABELLED/` or pass --grader REF")
    return entry.ref, max(children, key=lambda e: e.created).ref


def evaluate(request) -> dict:
    import torch

    from medcfx.provenance import record, write_json

    from medcfx_diffae.model import decode_codes, stochastic_encode
    from medcfx_diffae.trainer import load_images

    registry = request.registry
    ae_ref, grader_ref = _resolve(registry, request.model, request.options.get("grader") or "")
    grader, gentry = load_grader(registry, grader_ref)
    if registry.resolve(ae_ref).ref != gentry.parent:
        raise UsageError(f"grader {gentry.ref} belongs to {gentry.parent}, not to {ae_ref}")
    loaded = load_autoencoder(registry, gentry.parent, request.device)
    enc, dec = sampling_steps(request, loaded)
    n_rec = int(request.options.get("recon_images", 16))
    if n_rec < 0:
        raise UsageError(f"--recon-images must be >= 0, got {n_rec}")
    baseline = bool(request.options.get("baseline", True))
    train_data = request.options.get("train_data") or gentry.provenance.get("data") or ""
    if baseline and not (train_data and Path(train_data).exists()):
        raise UsageError(f"the CNN baseline trains on the grader's labelled data ({train_data or 'unknown'}), "
                         f"which is not here: pass --train-data PATH or --baseline=false")
    info = grader.info
    images, ss = load_images(request.data, loaded.preprocess)
    if images.shape[1] != loaded.model.channels:
        raise UsageError(f"--data {request.data}: images have {images.shape[1]} channel(s), "
                         f"{loaded.entry.ref} expects {loaded.model.channels}")
    target = binary_targets(ss.grade, label_column(ss, info.get("label", "")), info["positive_grades"],
                            info["negative_grades"], info.get("ungraded_positive", False))
    request.log(f"evaluating {gentry.ref} (autoencoder {loaded.entry.ref}) on {len(images)} images")
    z = semantic(loaded.model, images.to(request.device)).cpu().numpy().astype(np.float64)
    rows = []
    for clf in grader.planes:
        p = grader.predict(z, clf)
        rows.append({"encoder": "DAE", "classifier": {"svm": "SVM", "logreg": "LR"}[clf], "model": gentry.ref,
                     "C": info.get("regularisation", {}).get(clf, {}).get("C"),
                     **detection_metrics(target, p["distance"]),
                     **grading_metrics(ss.grade, p["grade"], grader.grade_range)})
    if baseline:
        tr_images, tr_ss = load_images(Path(train_data), loaded.preprocess)
        tr_target = binary_targets(tr_ss.grade, label_column(tr_ss, info.get("label", "")),
                                   info["positive_grades"], info["negative_grades"],
                                   info.get("ungraded_positive", False))
        steps = int(request.options.get("baseline_steps", 600))
        request.log(f"training the CNN baseline on {train_data} for {steps} steps")
        net = train_cnn(tr_images, tr_target, tr_ss.grade, steps, seed=request.seed)
        logit, gpred = cnn_predict(net, images)
        rows.append({"encoder": "-", "classifier": "CNN", "model": f"trained on {train_data}",
                     **detection_metrics(target, logit), **grading_metrics(ss.grade, gpred, grader.grade_range)})
    recon, quality = {}, None
    if n_rec:
        x = images[:n_rec].to(request.device)
        zs = torch.from_numpy(z[:n_rec].astype(np.float32)).to(request.device)
        x_T = stochastic_encode(loaded.model, loaded.schedule, x, zs, enc)
        # the reconstruction (own code) and the binary counterfactual (reflected code), from the same x_T
        z_cf = torch.from_numpy(grader.reflect(z[:n_rec]).astype(np.float32)).to(request.device)
        frames = decode_codes(loaded.model, loaded.schedule, torch.cat([x_T, x_T]), torch.cat([zs, z_cf]), dec)
        xr, xc = frames[:n_rec].cpu().numpy(), frames[n_rec:].cpu().numpy()
        errs = [recon_errors(a, b) for a, b in zip(images[:n_rec].numpy(), xr)]
        recon = {f"reconstruction_{k}": float(np.mean([e[k] for e in errs])) for k in errs[0]}
        recon["reconstruction_n"] = len(errs)
        after = grader.predict(semantic(loaded.model, frames[n_rec:]).cpu().numpy().astype(np.float64))
        quality = cf_quality(grader, ss, images[:n_rec].numpy(), xr, xc, z[:n_rec], after, inversion_limit(request))
    reliance = semantic_reliance(loaded, images[: max(n_rec, 32)], z[: max(n_rec, 32)], seed=request.seed)
    cvn = code_vs_noise(loaded, z[:16], tuple(images.shape[1:]), seed=request.seed, device=request.device)
    result = {"grader": gentry.ref, "autoencoder": loaded.entry.ref, "data": str(request.data),
              "semantic_reliance": reliance, "code_vs_noise": cvn,
              "encode_steps": enc, "decode_steps": dec, "rows": rows, **recon,
              **({"counterfactual_quality": {**quality["settings"], **quality["summary"]}} if quality else {}),
              "label_rule": {k: info.get(k) for k in ("positive_grades", "negative_grades", "ungraded_positive",
                                                      "label")}}
    out = Path(request.out or "medcfx-eval")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    if quality is not None:
        write_json(out / "counterfactual_quality.json", quality)
    atomic_write_bytes(out / "metrics.md", markdown_table(result).encode())
    write_json(out / "provenance.json", record(request, gentry, {"encode_steps": enc, "decode_steps": dec,
                                                               "recon_images": n_rec, "baseline": baseline,
                                                               "train_data": train_data}, [request.data]))
    if request.console is not None:
        _print_table(request.console, result)
        request.console.print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
        return {"printed": True}
    return result


def cf_quality(grader, ss, x: np.ndarray, rec: np.ndarray, cf: np.ndarray, z: np.ndarray, after: dict,
               limit: float) -> dict:
    """Per test image (the first len(x) rows) and aggregated: the inversion self-check of the reconstruction
    ``rec``, the flip of the reflection ``cf`` (``after``: the grader's prediction of the re-encoded
    counterfactuals) and the change of ``cf`` outside the lesion where the data carry a mask (else a box of
    the grader's label column); quality.py."""
    before = grader.predict(z)
    label = grader.info.get("label") or (ss.label_names[0] if ss.label_names else "")
    boxes = (ss.bbox or {}).get(label)
    masks, has_mask = ss.masks, (ss.has_mask if ss.masks is not None else None)
    cases = []
    for i in range(len(x)):
        diff = np.abs(np.asarray(cf[i], np.float64) - np.asarray(x[i], np.float64)).mean(axis=0) / 2
        region, source = None, None
        if masks is not None and bool(has_mask[i]):
            region, source = np.asarray(masks[i]) > 0, "mask"
        elif boxes is not None:
            region = cq.box_region(boxes[i], diff.shape)
            source = "box" if region is not None else None
        q = cq.case_quality(cq.inversion_check(x[i], rec[i], limit),
                            cq.flip(before["probability"][i], after["probability"][i], before["distance"][i],
                                    after["distance"][i]),
                            diff, region, source)
        cases.append({"case": str(ss.case_ids[i]), **q})
    settings = {"classifier": grader.info.get("classifier", "svm"), "counterfactual": "reflection across the "
                "hyperplane, decoded with the image's own x_T", "images": "the first --recon-images test images"}
    return {"settings": settings, "summary": cq.summarise(cases), "cases": cases}


def semantic_reliance(loaded, images, z: np.ndarray, seed: int = 0, timesteps=(100, 300, 500)) -> dict:
    """How much the denoiser uses z_sem: eps-MSE with each image's own code and with another image's code
    (the codes rolled by one), at a few timesteps: {t: [own, other, other / own]}.

    A ratio near 1 means the decoder ignores z_sem: x_T then carries the whole image and edits of z_sem
    (the counterfactuals) change little. Fixed noise from ``seed``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    x = images
    zt = torch.from_numpy(z.astype(np.float32))
    other = torch.roll(zt, 1, dims=0)
    out = {}
    with torch.no_grad():
        for t in timesteps:
            tt = torch.full((len(x),), int(t), dtype=torch.int64)
            noise = torch.randn(x.shape, generator=g)
            xt = loaded.schedule.q_sample(x, tt, noise)
            own = float((loaded.model.unet(xt, tt, z_sem=zt) - noise).pow(2).mean())
            oth = float((loaded.model.unet(xt, tt, z_sem=other) - noise).pow(2).mean())
            out[str(t)] = [own, oth, oth / own if own > 0 else math.nan]
    return out


def code_vs_noise(loaded, z: np.ndarray, shape, seed: int = 0, steps: int = 50, device: str = "cpu") -> dict:
    """What decides the decoded image, the semantic code or the stochastic code? Decode fresh Gaussian x_T
    (``steps`` DDIM steps) three ways: (n, z_i), (n, z_j) with j the next image's code, and (n', z_i):

        code  = mean |D(n, z_i) - D(n, z_j)|      the effect of changing z_sem
        noise = mean |D(n, z_i) - D(n', z_i)|     the effect of changing x_T
        ratio = code / noise

    In a working diffusion autoencoder z_sem fixes the content and x_T only details (Preechakul et al.,
    stochastic variations). Near 0, x_T decides the image and an edit of z_sem decoded with the image's own
    x_T changes little (docs/methods/diffae.md follows it over the demo autoencoder's training).
    For data x0 | z ~ N(m(z), s^2) the decoder is x0 = m(z) + s x_T, so code = |m(z_i) - m(z_j)| and
    noise = s E|n - n'| = 2 s / sqrt(pi).
    """
    import torch

    from medcfx_diffae.model import decode_codes

    if len(z) < 2:
        return {}
    g = torch.Generator().manual_seed(seed)
    zt = torch.from_numpy(np.asarray(z, np.float32)).to(device)
    n = torch.randn((len(z), *shape), generator=g).to(device)
    n2 = torch.randn((len(z), *shape), generator=g).to(device)
    codes = torch.cat([zt, torch.roll(zt, 1, dims=0), zt])
    x = decode_codes(loaded.model, loaded.schedule, torch.cat([n, n, n2]), codes, steps).double()
    a, b, c = x.chunk(3)
    code, noise = float((a - b).abs().mean()), float((a - c).abs().mean())
    return {"code": code, "noise": noise, "ratio": code / noise if noise > 0 else math.nan, "images": len(z),
            "steps": steps}


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def markdown_table(result: dict) -> str:
    lines = ["| Encoder | Classifier | Detection AUC | Detection F1 | Grading macro-F1 | Grading MAE |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['encoder']} | {r['classifier']} | {_fmt(r['detection_AUROC'])} | "
                     f"{_fmt(r['detection_F1'])} | {_fmt(r['grading_macro_F1'])} | {_fmt(r['grading_MAE'])} |")
    if result.get("semantic_reliance"):
        lines.append("")
        lines.append("Reliance on z_sem (eps-MSE with another image's code / with its own code): " + ", ".join(
            f"t={t}: {v[2]:.3f}" for t, v in result["semantic_reliance"].items()) + " (1 = z_sem ignored).")
    if result.get("code_vs_noise"):
        lines.append("")
        lines.append(_code_vs_noise_line(result["code_vs_noise"]))
    if result.get("counterfactual_quality"):
        lines.append("")
        lines.append(cq.text(result["counterfactual_quality"]))
    if "reconstruction_mse" in result:
        lines.append("")
        lines.append(f"Reconstruction (encode {result['encode_steps']} / decode {result['decode_steps']} DDIM "
                     f"steps, {result['reconstruction_n']} test images): MSE {result['reconstruction_mse']:.5f}, "
                     f"MAE {result['reconstruction_mae']:.4f}, PSNR {result['reconstruction_psnr_db']:.1f} dB "
                     f"(images in [-1, 1]).")
    return "\n".join(lines) + "\n"


def _code_vs_noise_line(c: dict) -> str:
    return (f"What decides a decoded image (fresh x_T, {c['steps']} steps, {c['images']} codes): changing z_sem moves "
            f"it by {c['code']:.3f}, changing x_T by {c['noise']:.3f} (ratio {c['ratio']:.2f}; near 0, x_T decides "
            f"the image and edits of z_sem change little).")


def _print_table(console, result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"diffae: {result['grader']} on {result['data']}")
    for col in ("encoder", "classifier", "detection AUC", "detection F1", "grading macro-F1", "grading MAE"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(r["encoder"], r["classifier"], _fmt(r["detection_AUROC"]), _fmt(r["detection_F1"]),
                      _fmt(r["grading_macro_F1"]), _fmt(r["grading_MAE"]))
    console.print(table)
    if result.get("semantic_reliance"):
        console.print("reliance on z_sem (eps-MSE other code / own code): " + ", ".join(
            f"t={t}: {v[2]:.3f}" for t, v in result["semantic_reliance"].items()))
    if result.get("code_vs_noise"):
        console.print(_code_vs_noise_line(result["code_vs_noise"]))
    if result.get("counterfactual_quality"):
        console.print(cq.text(result["counterfactual_quality"]), markup=False, highlight=False)
    if "reconstruction_mse" in result:
        console.print(f"reconstruction: MSE {result['reconstruction_mse']:.5f}, MAE {result['reconstruction_mae']:.4f}, "
                      f"PSNR {result['reconstruction_psnr_db']:.1f} dB over {result['reconstruction_n']} images")
