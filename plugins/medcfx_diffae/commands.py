"""The ``explain`` / ``grade`` / ``evaluate`` handlers of the diffae methods.

Per input image (each image's outputs are written to a staging folder renamed into place, so nothing is
half-written; an image that cannot be read is reported at the end while the others go on):

    x0 -> z_sem = Enc(x0) -> x_T = DDIM-inversion(x0 | z_sem)             (encode_steps, paper 250)
    codes: z_sem (reconstruction), reflect(z_sem) (binary counterfactual), to_grade(z_sem, g) per grade
    frames = DDIM-decode(x_T | code) for every code in one batch            (decode_steps, paper 100)
    score of each frame = calibrated grade of Enc(frame) (what the grader sees in the generated image)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcfx.errors import MedcfxError, UsageError
from medcfx.inputs import CaseLog, OutputDir

from medcfx_diffae import quality as cq
from medcfx_diffae.common import inversion_limit as _limit, recon_errors, sampling_steps as _steps
from medcfx_diffae.grader import GRADER_METHOD, load_grader
from medcfx_diffae.model import DEMO_GRADER, DEMO_MODEL, METHOD, load_autoencoder, load_input

# ---------------------------------------------------------------------------------------------------------
# shared pieces


def case_quality(x: np.ndarray, a, limit: float) -> dict:
    """The quality record of one analysed image: the inversion self-check from its reconstruction and, with
    a grader, the flip of the binary counterfactual (quality.py)."""
    inversion = cq.inversion_check(x, a.frames["reconstruction"], limit)
    flip = None
    if "counterfactual" in a.frames and a.prediction:
        flip = cq.flip(a.prediction["probability"], a.scores["counterfactual"]["probability"],
                       a.prediction["distance"], a.scores["counterfactual"]["distance"])
    return cq.case_quality(inversion, flip)


def _out_dirs(out: Path, paths) -> list[Path]:
    names, seen = [], {}
    for p in paths:
        stem = Path(p).name.split(".")[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(out / (stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"))
    return names


@dataclass
class Analysis:
    x: np.ndarray  # [C, S, S]
    frames: dict  # name -> [C, S, S]
    scores: dict  # name -> calibrated grade of Enc(frame)
    prediction: dict  # distance, probability, grade, grade_rounded of the input
    targets: dict  # name -> target grade / distance


def analyse(loaded, grader, classifier, x: np.ndarray, enc_steps: int, dec_steps: int, grades=(),
            binary: bool = True, device: str = "cpu") -> Analysis:
    """Encode one image, build the edited codes, decode them in one batch, score the frames."""
    import torch

    from medcfx_diffae.model import decode_codes, semantic, stochastic_encode

    model, schedule = loaded.model, loaded.schedule
    xt = torch.from_numpy(x[None]).to(device)
    z = semantic(model, xt)
    x_T = stochastic_encode(model, schedule, xt, z, enc_steps)
    z_np = z.cpu().numpy().astype(np.float64)
    codes = {"reconstruction": z_np[0]}
    pred, targets = {}, {}
    if grader is not None:
        p = grader.predict(z_np, classifier)
        pred = {k: (v[0].item() if hasattr(v[0], "item") else v[0]) for k, v in p.items()}
        if binary:
            codes["counterfactual"] = grader.reflect(z_np, classifier)[0]
            targets["counterfactual"] = {"distance": -pred["distance"]}
        plane = grader.plane(classifier)
        for g in grades:
            d_star = plane.distance_for_grade(float(g))
            codes[f"grade_{_gname(g)}"] = grader.move(z_np, d_star, classifier)[0]
            targets[f"grade_{_gname(g)}"] = {"grade": float(g), "distance": d_star}
    names = list(codes)
    zs = torch.from_numpy(np.stack([codes[n] for n in names]).astype(np.float32)).to(device)
    xs = decode_codes(model, schedule, x_T.expand(len(names), *x_T.shape[1:]).contiguous(), zs, dec_steps)
    frames = {n: xs[i].cpu().numpy() for i, n in enumerate(names)}
    scores = {}
    if grader is not None:
        zf = semantic(model, xs).cpu().numpy().astype(np.float64)
        pf = grader.predict(zf, classifier)
        scores = {n: {"grade": float(pf["grade"][i]), "distance": float(pf["distance"][i]),
                      "probability": float(pf["probability"][i])} for i, n in enumerate(names)}
    return Analysis(x, frames, scores, pred, targets)


def _gname(g) -> str:
    g = float(g)
    return str(int(g)) if g == int(g) else f"{g:g}".replace("-", "m").replace(".", "p")


def _heat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(axis=0)


def _png(img, path: Path) -> Path:
    from medcfx.viz import save_png

    return save_png(img, path)


def _resolve_models(registry, ref: str | None, grader_ref: str | None, default_ref: str):
    """(autoencoder Loaded-args ref, grader entry or None) from a reference that may name either."""
    entry = registry.resolve(ref or default_ref)
    if entry.method == GRADER_METHOD:
        return entry.parent, entry.ref
    if entry.method != METHOD:
        raise UsageError(f"model {entry.ref} is a '{entry.method}' model, not a diffae autoencoder or grader")
    return entry.ref, (grader_ref or None)


# ---------------------------------------------------------------------------------------------------------
# grade


class GraderSampler:
    """``medcfx grade IMAGE [--model GRADER] [--out DIR]``."""

    def grade(self, request):
        from medcfx.provenance import record, write_json
        from medcfx.viz import grid, heat_rgb

        from medcfx_diffae.model import to_display

        registry = request.registry
        grader, gentry = load_grader(registry, request.model or DEMO_GRADER)
        loaded = load_autoencoder(registry, gentry.parent, request.device)
        classifier = request.options.get("classifier") or None
        grader.plane(classifier)
        cname = classifier or grader.info.get("classifier", "svm")
        enc, dec = _steps(request, loaded)
        grades = _target_grades(request.options.get("grades"), grader)
        limit = _limit(request)
        out = Path(request.out or "medcfx-out")
        results = []
        log = CaseLog()  # an image that cannot be read is reported at the end; the others go on
        for path, folder in zip(request.inputs, _out_dirs(out, request.inputs)):
            with log.case(str(path), Path(path).name):
                x = load_input(Path(path), loaded.preprocess, loaded.model.channels, log=request.log)
                a = analyse(loaded, grader, classifier, x, enc, dec, grades, binary=True, device=request.device)
                p = a.prediction
                rec = recon_errors(x, a.frames["reconstruction"])
                quality = case_quality(x, a, limit)
                flag = " FLAGGED" if quality["inversion"]["flagged"] else ""
                names = [f"grade_{_gname(g)}" for g in grades]
                with OutputDir(folder.parent, folder.name) as tmp:
                    _png(to_display(x), tmp / "input.png")
                    _png(to_display(a.frames["reconstruction"]), tmp / "reconstruction.png")
                    _png(to_display(a.frames["counterfactual"]), tmp / "counterfactual.png")
                    vmax = max([_heat(x, a.frames[n]).max() for n in ["counterfactual", *names]] + [1e-6])
                    _png(heat_rgb(_heat(x, a.frames["counterfactual"]), vmax), tmp / "diff_counterfactual.png")
                    for n in names:
                        _png(to_display(a.frames[n]), tmp / f"{n}.png")
                        _png(heat_rgb(_heat(x, a.frames[n]), vmax), tmp / f"diff_{n}.png")
                    # the strip (strip.py): the input and one frame per target grade with the grade read back
                    # from it, the reflection and the difference maps below, on the input's grid, with a legend
                    # and a note for each target that was not reached
                    from medcfx_diffae.strip import target_check, write_strip

                    targets = target_check(grades, names, a.scores)
                    write_strip(tmp / "strip.png", Path(path), loaded.preprocess, loaded.model.channels, x, a,
                                grades, names, targets, quality, cname,
                                title=f"{Path(path).name}  |  grader {gentry.ref}  |  autoencoder {loaded.entry.ref}")
                    _png(grid([[to_display(x), to_display(a.frames["reconstruction"]),
                                heat_rgb(_heat(x, a.frames["reconstruction"]), vmax),
                                to_display(a.frames["counterfactual"]),
                                heat_rgb(_heat(x, a.frames["counterfactual"]), vmax)]],
                              [["input", "reconstruction", f"|x-rec|{flag}", "counterfactual", "|x-cf|"]], scale=3),
                         tmp / "panel.png")
                    result = {
                        "input": str(path), "grader": gentry.ref, "autoencoder": loaded.entry.ref,
                        "classifier": cname,
                        "grade": p["grade"], "grade_rounded": int(p["grade_rounded"]),
                        "probability": p["probability"], "distance": p["distance"],
                        "reconstruction": rec,
                        "frames": {n: {**a.targets.get(n, {}), "score": a.scores[n]} for n in a.frames},
                        "targets": targets,
                        "quality": quality,
                    }
                    write_json(tmp / "result.json", result)
                    params = {"classifier": cname, "encode_steps": enc, "decode_steps": dec, "grades": list(grades),
                              "normalisation": grader.info.get("normalisation"), "inversion_limit": limit}
                    write_json(tmp / "provenance.json", record(request, gentry, params, [path],
                                                               autoencoder=loaded.entry.ref,
                                                               autoencoder_sha256=loaded.entry.digest,
                                                               quality=quality))
                results.append(result)
                request.log(f"{Path(path).name}: grade {p['grade']:.2f} -> G{int(p['grade_rounded'])} | "
                            f"P(positive) {p['probability']:.3f} | distance {p['distance']:+.3f} ({cname}) | "
                            f"{cq.case_line(quality)} | -> {folder}")
                if targets["note"]:
                    request.log(f"note: {Path(path).name}: {targets['note']}")
                if quality["inversion"]["flagged"]:
                    request.log(cq.warning_text(path, quality["inversion"]))
        _flag_summary(request, results, limit)
        return log.finish({"results": results} if request.console is None else {"printed": True})


def _flag_summary(request, results: list[dict], limit: float) -> None:
    if results:
        n = sum(bool(r["quality"]["inversion"]["flagged"]) for r in results)
        request.log(f"self-check: {n} of {len(results)} case(s) flagged (reconstruction error above {limit:g})")


def _target_grades(option, grader) -> list[float]:
    if option:
        try:
            return [float(g) for g in option]
        except ValueError:
            raise UsageError(f"--grades expects numbers, got {','.join(option)}") from None
    lo, hi = grader.grade_range
    return [float(g) for g in range(lo, hi + 1)]


# ---------------------------------------------------------------------------------------------------------
# explain


class AESampler:
    """``medcfx explain INPUT --method diffae [--model AE|GRADER] [--reconstruct] [--grader GRADER]``."""

    def explain(self, request):
        from medcfx.provenance import record, write_json
        from medcfx.viz import grid, heat_rgb

        from medcfx_diffae.model import to_display

        registry = request.registry
        reconstruct = bool(request.options.get("reconstruct"))
        ae_ref, grader_ref = _resolve_models(registry, request.model, request.options.get("grader"),
                                             DEMO_MODEL if reconstruct else DEMO_GRADER)
        if not reconstruct and grader_ref is None:
            raise UsageError("explain --method diffae: nothing to do; pass --reconstruct and/or a grader "
                             "(--grader REF or --model GRADER)")
        grader = gentry = None
        if grader_ref is not None:
            grader, gentry = load_grader(registry, grader_ref)
            if gentry.parent != registry.resolve(ae_ref).ref:
                raise UsageError(f"grader {gentry.ref} belongs to {gentry.parent}, not to {ae_ref}")
        loaded = load_autoencoder(registry, ae_ref, request.device)
        classifier = request.options.get("classifier") or None
        if grader is not None:
            grader.plane(classifier)
        enc, dec = _steps(request, loaded)
        limit = _limit(request)
        out = Path(request.out or "medcfx-out")
        summary = []
        log = CaseLog()  # an image that cannot be read is reported at the end; the others go on
        for path, folder in zip(request.inputs, _out_dirs(out, request.inputs)):
            with log.case(str(path), Path(path).name):
                x = load_input(Path(path), loaded.preprocess, loaded.model.channels, log=request.log)
                a = analyse(loaded, grader, classifier, x, enc, dec, (), binary=grader is not None,
                            device=request.device)
                rec = recon_errors(x, a.frames["reconstruction"])
                quality = case_quality(x, a, limit)
                flag = " FLAGGED" if quality["inversion"]["flagged"] else ""
                with OutputDir(folder.parent, folder.name) as tmp:
                    images, titles = [to_display(x)], ["input"]
                    _png(to_display(x), tmp / "input.png")
                    vmax = max([_heat(x, f).max() for f in a.frames.values()] + [1e-6])
                    if reconstruct:
                        _png(to_display(a.frames["reconstruction"]), tmp / "reconstruction.png")
                        _png(heat_rgb(_heat(x, a.frames["reconstruction"]), vmax), tmp / "diff_reconstruction.png")
                        images += [to_display(a.frames["reconstruction"]), heat_rgb(_heat(x, a.frames["reconstruction"]), vmax)]
                        titles += ["reconstruction", f"|x-rec| mse {rec['mse']:.4f}{flag}"]
                    if grader is not None:
                        _png(to_display(a.frames["counterfactual"]), tmp / "counterfactual.png")
                        _png(heat_rgb(_heat(x, a.frames["counterfactual"]), vmax), tmp / "diff_counterfactual.png")
                        images += [to_display(a.frames["counterfactual"]), heat_rgb(_heat(x, a.frames["counterfactual"]), vmax)]
                        titles += [f"counterfactual {a.scores['counterfactual']['grade']:.2f}", "|x-cf|"]
                    _png(grid([images], [titles], scale=3), tmp / "panel.png")
                    result = {"input": str(path), "autoencoder": loaded.entry.ref,
                              "grader": gentry.ref if gentry else None}
                    if reconstruct:
                        result["reconstruction"] = rec
                    if grader is not None:
                        result.update(prediction=a.prediction, counterfactual=a.scores["counterfactual"])
                    result["quality"] = quality
                    write_json(tmp / "result.json", result)
                    params = {"encode_steps": enc, "decode_steps": dec, "reconstruct": reconstruct,
                              "classifier": classifier, "inversion_limit": limit}
                    write_json(tmp / "provenance.json", record(request, loaded.entry, params, [path],
                                                               grader=gentry.ref if gentry else None,
                                                               quality=quality))
                summary.append(result)
                msg = f"{Path(path).name}:"
                if reconstruct:
                    msg += f" reconstruction MSE {rec['mse']:.5f}, MAE {rec['mae']:.4f}, PSNR {rec['psnr_db']:.1f} dB;"
                if grader is not None:
                    msg += (f" grade {a.prediction['grade']:.2f} -> counterfactual "
                            f"{a.scores['counterfactual']['grade']:.2f};")
                request.log(f"{msg} {cq.case_line(quality)}; -> {folder}")
                if quality["inversion"]["flagged"]:
                    request.log(cq.warning_text(path, quality["inversion"]))
        _flag_summary(request, summary, limit)
        return log.finish({"results": summary} if request.console is None else {"printed": True})


# ---------------------------------------------------------------------------------------------------------
# evaluate


class AEScorer:
    """``medcfx evaluate diffae --model AE|GRADER --data test/``."""

    def evaluate(self, request):
        from medcfx_diffae.evaluate import evaluate

        return evaluate(request)


__all__ = ["AESampler", "AEScorer", "GraderSampler", "analyse", "recon_errors", "MedcfxError"]
