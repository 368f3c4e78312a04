"""The sanchez plugin's methods: the paper's method and its baselines, as medcfx Methods.

``sanchez``         implicit guidance + attention conditioning + dynamic normalisation (the paper);
                    ``--set conditioning=adagn`` trains the AdaGN-only baseline, ``--guidance 0`` decodes
                    with the null branch (no guidance), ``--dn-percentile 0`` uses static clipping
                    (together: the Table 2 chain).
``cdpm-healthy``    the same UNet, unconditional, trained on healthy slices only (CDPM_healthy).
``cdpm-classifier`` unconditional UNet on all slices + noise-aware classifier, gradient guidance towards
                    healthy while decoding (Wolleb et al. 2022; "CDPM + classifier").
``threshold``       intensity thresholding of one channel (Meissen et al. 2021); no training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medcfx import figures
from medcfx.config import deep_merge
from medcfx.data.preprocess import PreprocessConfig
from medcfx.diffusion import Schedule, log_prob_gradient
from medcfx.errors import UsageError
from medcfx.export import denoiser_for
from medcfx.evaluation import calibrate_entry, cases_reader, evaluate_cases, evaluate_maps, select_rows
from medcfx.batch import run_explain
from medcfx.inputs import OutputDir, write_map, write_native
from medcfx.scoring import decide, image_score, most_anomalous, native_map, operating_point, score_cases
from medcfx.loading import load_state, load_unet
from medcfx.method import Method, Option
from medcfx.provenance import record, write_json
from medcfx.train import register_fit

from .counterfactual import HEALTHY, SOLVERS, CFParams, counterfactual, heatmap, reconstruction
from .flip import FlipRecorder
from . import threshold as thr
from .networks import DEFAULTS, NoisyClassifier
from .train import saved_config, train_classifier, train_diffusion

GUIDANCE_KIND = {"sanchez": "cfg", "cdpm-healthy": "none", "cdpm-classifier": "classifier"}
DEFAULT_GUIDANCE = {"sanchez": 3.0, "cdpm-healthy": 0.0, "cdpm-classifier": 100.0}
# --sampler: "paper" is the authors' loop (DDIM at the model's explain.steps, guidance at every step);
# "fast" is the fastest path whose cost in ideal Dice on the demo test set is within run-to-run noise
# (docs/speed.md, benchmarks/sampling.py). An explicit --steps / --solver / --guidance-interval (or --set)
# overrides the sampler's value. The baselines keep the paper's loop by default (their tables are the paper's).
SAMPLERS = ("fast", "paper")
FAST_SAMPLER = {"solver": "dpm++2m", "step_fraction": 0.4, "guidance_interval": "0:1", "reuse_inversion": True}
FAST_TEXT = (f"{FAST_SAMPLER['solver']} at {FAST_SAMPLER['step_fraction']:g} x the model's steps, the decode's null "
             f"branch reused from the inversion")


# ---------------------------------------------------------------------------------------------- options

def _sampling_options(method: str) -> list[Option]:
    return [
        Option("guidance", float, None, f"guidance scale (cfg w / classifier s; default {DEFAULT_GUIDANCE[method]:g})",
               bounds="[0, inf)"),
        Option("noise_level", float, None, "encoding depth L as a fraction of the respaced steps (default 0.75)",
               bounds="(0, 1]"),
        Option("sampler", str, None, "fast (default for sanchez: " + FAST_TEXT + ") or paper (the authors' loop: "
                                     "DDIM at the model's steps, guidance at every step)", choices=SAMPLERS),
        Option("steps", int, None, "respaced steps, used as given (default: the model's with --sampler paper, 100 "
                                   "for the bundled one; 0.4 x that with the fast sampler)", bounds="[1, inf)"),
        Option("dn_percentile", float, None, "dynamic normalisation percentile; 0 = static clip (default 0.99)",
               bounds="[0, 1)"),
        Option("solver", str, None, "encode/decode solver: ddim (the paper), dpm++2m (second order; for fewer "
                                    "--steps) or dpm++3m (third order)", choices=SOLVERS),
        Option("guidance_interval", str, None, "LO:HI: guide only where LO <= t/T <= HI, the healthy branch alone "
                                               "elsewhere (half the cost per step; default 0:1 = every step)"),
        Option("reuse_inversion", bool, None, "take the decode's null branch from the inversion at the same "
                                              "timestep (one forward per guided step instead of two; not the "
                                              "paper's; cost in docs/speed.md; --reuse-inversion=false "
                                              "turns the fast sampler's off)"),
        Option("batch_size", int, None, "slices per batch (default 8)", bounds="[1, inf)"),
    ]


EXPLAIN_EXTRA = [
    Option("slice", int, None, "explain only this slice index of a volume (default: every slice)", bounds="[0, inf)"),
    Option("display", str, None, "channel shown in the PNG panels (default: flair, else the last)"),
]
EVAL_EXTRA = [
    Option("slice_stride", int, 1, "score every k-th slice of each case (only those slices' voxels count)",
           bounds="[1, inf)"),
    Option("max_slices", int, 0, "score at most this many slices per case, spread evenly (0: all)", bounds="[0, inf)"),
]
# the inversion self-check: mean |x - reconstruction| in [0, 1] intensity units per slice; a slice above twice
# the largest error measured with the bundled sanchez-demo on healthy-looking demo brains (the demo case and 3
# demo brains, 6 slices each; benchmarks/self_check.py, docs/operating-points.md) is flagged. Per sampler,
# because their round trips differ: paper (100 DDIM steps) 0.006-0.016 -> 0.03; fast (dpm++2m, 40 steps)
# 0.012-0.042 (the multistep inversion reproduces the input less exactly; the Dice does not change) -> 0.08.
SELF_CHECK_LIMITS = {"paper": 0.03, "fast": 0.08}


def self_check_limit(params: CFParams) -> float:
    return SELF_CHECK_LIMITS[params.sampler]


SELF_CHECK = Option("self_check_slices", int, 2, "slices per case whose unguided encode/decode is checked against "
                                                 "the input (0: none; each costs one more counterfactual)",
                    bounds="[0, inf)")
# the panels' colour scales: one fixed range per kind of map, the same for every slice and case
# (docs/methods/sanchez.md). 0.5 = a quarter of the intensity range; the bundled sanchez-demo's heatmap of
# its demo case peaks at 0.38 (mean 0.16 inside the tumour), so the tumour sits mid-scale, unsaturated.
HEAT_SCALE = figures.MapScale("heatmap = mean |x - x_cf| over channels (images in [-1, 1])", 0.5)
THRESHOLD_SCALE = figures.MapScale("heatmap = intensity / its median foreground intensity (median-filtered)", 3.0)
DECISION_EXTRA = [
    Option("operating_point", str, None, "calibrated threshold for mask.nii.gz: fpr<N> (default) or valDice"),
    Option("min_size", int, 1, "smallest lesion component kept, in voxels (pixels in 2D)", bounds="[1, inf)"),
]


def _params(request, method: str, entry=None) -> CFParams:
    """Sampling parameters, by precedence: the flag (--guidance ...), a -c/--set value (one the user gave,
    even if it equals the default), the --sampler's value (fast), the model's own ``explain`` config (saved at
    training), the method's default."""
    defaults = request.method.defaults.get("explain", {})
    user = request.config.get("explain", {})
    saved = entry.config.get("explain", {}) if entry is not None else {}

    explicit = (getattr(request, "user_config", None) or {}).get("explain", {})  # -c / --set keys, as given

    def pick(name, fallback, preset=None):
        if request.options.get(name) is not None:
            return request.options[name]
        if name in explicit:
            return explicit[name]
        if name in user and user[name] != defaults.get(name):
            return user[name]
        if preset is not None and name in preset:
            return preset[name]
        return saved.get(name, defaults.get(name, fallback))

    sampler = str(pick("sampler", "paper"))
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler (explain.sampler) must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    fast = None
    if sampler == "fast":  # the model's (paper) step count scaled, so that a model saved with few steps stays fast
        paper_steps = int(pick("steps", 100, {}))
        steps, noise = round(paper_steps * FAST_SAMPLER["step_fraction"]), float(pick("noise_level", 0.75))
        while steps < paper_steps and round(noise * steps) < 2:  # L = 0 or 1 encodes to t = 0 at most: too few
            steps += 1
        fast = {**FAST_SAMPLER, "steps": steps,
                "reuse_inversion": FAST_SAMPLER["reuse_inversion"] and GUIDANCE_KIND[method] == "cfg"}
    params = CFParams(sampler=sampler, guidance=float(pick("guidance", DEFAULT_GUIDANCE[method])),
                      noise_level=float(pick("noise_level", 0.75)), steps=int(pick("steps", 100, fast)),
                      dn_percentile=float(pick("dn_percentile", 0.99)),
                      solver=str(pick("solver", "ddim", fast)),
                      guidance_interval=pick("guidance_interval", "0:1", fast),
                      reuse_inversion=bool(pick("reuse_inversion", False, fast))).check()
    d = (entry.config.get("diffusion") if entry is not None else None) or {"schedule": "linear", "T": 1000}
    grid = Schedule.create(d["schedule"], d["T"]).respace(f"ddim{params.steps}")
    if grid.t_of(grid.level_for_fraction(params.noise_level)) == 0:  # L = 1 on a grid that starts at t = 0
        raise UsageError(f"--steps {params.steps} with --noise-level {params.noise_level:g} encodes only to model "
                         f"timestep 0 (no noise): the counterfactual would be the input and the heatmap about 0; "
                         f"use more --steps")
    if GUIDANCE_KIND[method] == "none" and params.guidance_interval != "0:1":
        raise UsageError(f"--guidance-interval: {method} decodes without guidance; the option does not apply")
    if GUIDANCE_KIND[method] != "cfg" and params.reuse_inversion:
        raise UsageError(f"--reuse-inversion: {method} has no classifier-free null branch to reuse")
    return params


# ---------------------------------------------------------------------------------------------- mappers


class Mapper:
    """x [b, C, S, S] in [-1, 1] -> (counterfactual or None, map [b, S, S]) for one method and model."""

    def __init__(self, method: str, request, entry=None):
        self.method = method
        self.entry = entry
        self.device = request.device
        self.flips = None  # cdpm-classifier: P(healthy) before / after of every mapped slice (flip rate)
        model, entry = load_unet(request.registry, entry.ref if entry else request.model, device=self.device)
        self.params = _params(request, method, entry)
        self.entry = entry
        self.model = model
        d = entry.config["diffusion"]
        self.schedule = Schedule.create(d["schedule"], d["T"])
        self.denoiser = denoiser_for(request, entry, model)
        self.channels = model.config.in_channels
        self.grad = None
        if method == "cdpm-classifier":
            clf = NoisyClassifier(entry.config["classifier"])
            load_state(clf, request.registry.load_tensors(entry, "classifier"), f"{entry.ref} (classifier)")
            clf.to(self.device).eval()
            self.grad = log_prob_gradient(
                lambda x, t, cond: torch.log_softmax(clf(x, t), dim=1)[:, HEALTHY])
            self.flips = FlipRecorder(clf)

    def self_check(self, case, n_slices: int, batch_size: int) -> dict | None:
        """The inversion self-check of ``case`` (see ``counterfactual.reconstruction``) on ``n_slices`` of its
        sampled slices spread evenly: the mean absolute error |x - reconstruction| in intensity units [0, 1]
        (channel and pixel mean) per checked slice, and ``flagged`` when the largest exceeds
        the sampler's limit (SELF_CHECK_LIMITS; the heatmap of this case then shows reconstruction error,
        not only lesion). None for ``n_slices`` = 0."""
        if n_slices <= 0:
            return None
        rows = select_rows(len(case.images), max_slices=n_slices)
        errors = []
        for i in range(0, len(rows), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(case.images[rows[i:i + batch_size]])).to(self.device)
            with torch.no_grad():
                rec = reconstruction(self.denoiser, x, self.schedule, self.params, GUIDANCE_KIND[self.method],
                                     null_label=self.model.null_label)
            errors += ((x - rec).abs().mean(dim=(1, 2, 3)) / 2).cpu().tolist()
        worst = max(errors)
        return {"slices": [int(case.slice_index[r]) for r in rows], "mean_abs_error": errors,
                "limit": self_check_limit(self.params), "flagged": bool(worst > self_check_limit(self.params))}

    def __call__(self, x: torch.Tensor, channel: int | None = None):
        x_cf = counterfactual(self.denoiser, x, self.schedule, self.params, GUIDANCE_KIND[self.method],
                              null_label=self.model.null_label, classifier_grad=self.grad)
        if self.flips is not None:
            self.flips.add(x, x_cf)
        return x_cf, heatmap(x, x_cf)


def make_mapper(method: str, request, entry=None):
    """The Mapper of a method, or the thresholding baseline's (no model; ``threshold.ThresholdMapper``)."""
    if method == "threshold":
        return thr.ThresholdMapper(int(_option(request, "median_filter", thr.MEDIAN_FILTER)),
                                   _preprocess(request, None).size)
    return Mapper(method, request, entry)


def _shown(request_options: dict, method: str, channels: list[str]) -> int:
    """The channel a method's panels show; for the threshold baseline also the one it thresholds (--channel,
    else --display, else flair / the last)."""
    if method == "threshold":
        return thr.channel_index(channels, request_options.get("channel") or request_options.get("display"))
    return _display_channel(channels, request_options.get("display"))


def _resolve_entry(request, method: str):
    if method == "threshold":
        if request.model is not None:
            raise UsageError(f"--model {request.model}: threshold has no model (it thresholds the input's "
                             f"intensity); leave --model out")
        return None
    if request.model is None:
        raise UsageError(f"{method} needs --model REF (see `medcfx models list`)")
    entry = request.registry.resolve(request.model)
    if entry.method != method:
        raise UsageError(f"model {entry.ref} was trained by method '{entry.method}', not '{method}'")
    return entry


def _preprocess(request, entry) -> PreprocessConfig:
    base = entry.config["preprocess"] if entry is not None else request.config["preprocess"]
    return PreprocessConfig.from_dict(base)


def _display_channel(channels: list[str], wanted: str | None) -> int:
    if wanted:
        if wanted not in channels:
            raise UsageError(f"--display {wanted}: the input's channels are {', '.join(channels)}")
        return channels.index(wanted)
    return channels.index("flair") if "flair" in channels else len(channels) - 1


# ---------------------------------------------------------------------------------------------- components


class Trainer:
    def __init__(self, method: str):
        self.method = method

    def train(self, request) -> dict:
        kind = {"sanchez": "sanchez", "cdpm-healthy": "healthy", "cdpm-classifier": "full"}[self.method]
        out = train_diffusion(request, kind)
        result, run = out["result"], out["run"]
        clf = None
        if self.method == "cdpm-classifier":
            clf, _ = train_classifier(request, out["ss"], run / "classifier" if run is not None else None)
        if run is None:  # a non-zero DDP rank: rank 0 registers
            return {"printed": True}
        extra = {"classifier": request.config["classifier"]} if clf is not None else {}
        config = saved_config(request, out["net_cfg"], extra)
        modules = {"classifier": clf} if clf is not None else {}
        entry = register_fit(request, result, f"{self.method}", config=config,
                             metrics={"final_loss": result.final_loss, "train_slices": out["train_slices"]},
                             modules=modules)
        metrics = self._validate(request, entry, out)
        if metrics:
            entry = request.registry.add_artifacts(entry.ref, {}, extra={"metrics": metrics})
        return {"model": entry.ref, "run": str(run), "metrics": entry.metrics}

    def _validate(self, request, entry, out) -> dict:
        """Score held-out validation cases with the explain defaults (pixel AUPRC / ideal Dice)."""
        n = int(request.config.get("val_slices", 0))
        ss, rows = out["ss"], out["val_rows"]
        rows = np.asarray([r for r in rows if ss.has_mask[r]], dtype=np.int64)
        if n <= 0 or len(rows) == 0:
            return {}
        lesion = np.asarray([ss.labels[r, 0] == 1 for r in rows])
        # half lesion slices, half healthy ones, spread evenly, so the metrics mean something on few slices
        pick = np.concatenate([select_rows(0, rows=rows[lesion], max_slices=(n + 1) // 2),
                               select_rows(0, rows=rows[~lesion], max_slices=n // 2)])
        mapper = Mapper(self.method, request, entry)
        m = evaluate_maps(lambda x, b: mapper(x)[1], ss, ss, np.sort(pick),
                          batch_size=int(request.config["explain"]["batch_size"]), device=request.device)
        request.log(f"validation on {m['slices']} held-out slices: pixel AUPRC {m['pixel_AUPRC']:.3f}, "
                    f"ideal Dice {m['pixel_ideal_Dice']:.3f}")
        return {f"val_{k}": v for k, v in m.items() if k in ("pixel_AUPRC", "pixel_ideal_Dice", "image_AUROC", "slices")}


class Sampler:
    def __init__(self, method: str):
        self.method = method

    def explain(self, request) -> dict:
        entry = _resolve_entry(request, self.method)
        cfg = _preprocess(request, entry)
        mapper = make_mapper(self.method, request, entry)
        _shown(request.options, self.method, list(cfg.modalities))  # a bad --channel / --display: before any work
        channels = mapper.channels if self.method != "threshold" else None
        bs = request.options.get("batch_size") or int(request.config["explain"]["batch_size"])
        point, said = operating_point(request, entry, mapper.params.__dict__ if mapper.params else {}, self.method)
        return run_explain(request, cfg, channels if channels is not None else len(cfg.modalities), entry,
                           lambda case: self._explain_case(request, entry, mapper,
                                                           case.select(request.options.get("slice")), bs, point),
                           {"method": self.method, "model": entry.ref if entry else None, "out": str(request.out),
                            **said})

    def _explain_case(self, request, entry, mapper, case, bs: int, point) -> dict:
        show = _shown(request.options, self.method, case.channels)
        if mapper.flips is not None:
            mapper.flips.reset()
        x_all = torch.from_numpy(np.ascontiguousarray(case.images))
        cfs, maps = [], []
        for i in range(0, len(x_all), bs):
            x = x_all[i:i + bs].to(request.device)
            x_cf, hm = mapper(x, channel=show)
            cfs.append((x_cf if x_cf is not None else x).cpu())
            maps.append(hm.cpu())
        x_cf = torch.cat(cfs).numpy()
        hm = torch.cat(maps).numpy()
        heat = native_map(case, hm)
        flip = None if mapper.flips is None else mapper.flips.take(len(hm), heat, case.result.lesion,
                                                                   case.scored_region)
        check = mapper.self_check(case, int(_option(request, "self_check_slices", 2)), bs)
        decision = None
        if point is not None:
            decision = decide(case, heat, point[0], point[1], int(request.options.get("min_size") or 1))
        with OutputDir(request.out, case.id) as folder:
            files = [write_native(case, folder, "heatmap", heat)]
            if decision is not None:
                files.append(write_native(case, folder, "mask", decision.mask))
            if self.method != "threshold":
                for c, name in enumerate(case.channels):
                    files.append(write_map(case, folder, f"counterfactual_{name}", (x_cf[:, c] + 1) / 2))
            scale = THRESHOLD_SCALE if self.method == "threshold" else HEAT_SCALE
            tiles = [("input", case.images[:, show])]
            if self.method != "threshold":
                tiles.append(("counterfactual", x_cf[:, show]))
            figures.CasePanels(case, tiles, heat, scale, channel=case.channels[show],
                               model=entry.ref if entry is not None else "none (threshold)", map_title="heatmap",
                               decision=decision).write(folder)
            params = {"method": self.method, **(mapper.params.__dict__ if mapper.params else
                                                 mapper.describe(case.channels[show])),
                      "backend": request.extra.get("backend", "torch"), "bf16": bool(request.extra.get("bf16")),
                      "display_channel": case.channels[show], "model_size": int(case.images.shape[-1]),
                      "panel_colour_scale": [scale.vmin, scale.vmax]}
            extra = {"decision": decision.to_dict() if decision is not None else None, "self_check": check,
                     **({"flip": flip} if flip is not None else {}),
                     "image_score": image_score(case, heat), "most_anomalous_slice": most_anomalous(case, hm)}
            write_json(folder / "provenance.json", record(request, entry, params, [case.source],
                                                          case=case.id, slices=[int(k) for k in case.slice_index],
                                                          notes=case.notes, **extra))
        out = {"case": case.id, "slices": int(len(hm)), "heatmap_mean": float(hm.mean()),
               "most_anomalous_slice": most_anomalous(case, hm),
               "folder": str(request.out / case.id)}
        if decision is not None:
            d = decision.to_dict()
            out.update({"decision": d["decision"], "n_components": d["n_components"],
                        f"lesion_{decision.unit.replace('^', '')}": decision.lesion_size})
        if flip is not None:
            out.update({"flip_rate": flip["flip_rate"], "p_target_before": flip["p_target_before_mean"],
                        "p_target_after": flip["p_target_after_mean"]})
        if check is not None:
            out["self_check_error"] = max(check["mean_abs_error"])
            if check["flagged"]:
                out["warning"] = (f"inversion self-check failed: encode + unguided decode differs from the input by "
                                  f"{out['self_check_error']:.3f} > {check['limit']} (mean |x - x_rec| in [0, 1]); "
                                  f"this heatmap shows reconstruction error as much as lesion")
        return out


class Scorer:
    def __init__(self, method: str):
        self.method = method

    def evaluate(self, request) -> dict:
        entry = _resolve_entry(request, self.method)
        options, choice = request.options, None
        if self.method == "threshold" and options.get("channel") == "auto":
            cfg = _preprocess(request, None)
            modalities = list(cfg.modalities)
            cases_reader(cfg, len(modalities), options)(request.data)  # an unreadable test set: before the val pass
            name, ap = thr.choose_channel(modalities, request.extra.get("val"),
                                          lambda c, val: run_evaluation(request, "threshold", None,
                                                                        {**options, "channel": c}, val)["pixel_AUPRC"])
            request.log(f"--channel auto: {name} (validation pixel AP " + ", ".join(f"{k} {v:.3f}" for k, v in ap.items())
                        + ")")
            options, choice = {**options, "channel": name}, {"rule": "best validation pixel AP", "validation_AP": ap}
        map_batch, cases_of, bs, context, mapper = _scoring(request, self.method, entry, options)
        if choice is not None:
            context["channel_choice"] = choice
        n = int(_option(request, "self_check_slices", 2))
        return evaluate_cases(request, self.method, entry, map_batch, cases_of, bs, context,
                              self_check=lambda case: mapper.self_check(case, n, bs), flips=mapper.flips)

    def calibrate(self, request) -> dict:
        entry = _resolve_entry(request, self.method)
        if entry is None:
            raise UsageError(f"{self.method} has no model to store a calibration with; give `medcfx evaluate "
                             f"{self.method} --val VALIDATION_SET` to calibrate it for one evaluation")
        map_batch, cases_of, bs, context, _ = _scoring(request, self.method, entry, request.options)
        return calibrate_entry(request, self.method, entry, map_batch, cases_of, bs, context)


def _scoring(request, method: str, entry, options: dict):
    """(map_batch, cases_of, batch size, settings, mapper) of one method/model for :mod:`medcfx.scoring`."""
    cfg = _preprocess(request, entry)
    req = _with_options(request, options)
    mapper = make_mapper(method, req, entry)
    show = _shown(req.options, method, list(cfg.modalities))
    channels = mapper.channels if method != "threshold" else len(cfg.modalities)
    bs = options.get("batch_size") or int(request.config["explain"]["batch_size"])
    context = {"backend": req.extra.get("backend", "torch"), "bf16": bool(req.extra.get("bf16")),
               "slice_stride": options.get("slice_stride") or 1, "max_slices": options.get("max_slices") or 0,
               **(dict(mapper.params.__dict__) if mapper.params else {
                   **mapper.describe(cfg.modalities[show]),
                   "normalisation": f"x / foreground percentile {cfg.percentile:g}" + (", clipped" if cfg.clip else "")})}
    return ((lambda x, start: mapper(x, channel=show)[1]), cases_reader(cfg, channels, options, log=request.note), bs,
            context, mapper)


def run_evaluation(request, method: str, entry, options: dict, data: Path) -> dict:
    """Threshold-free metrics, counts and the settings ("context") of one method/model on an annotated set
    (the sweep's figures)."""
    map_batch, cases_of, bs, context, _ = _scoring(request, method, entry, options)
    cm = score_cases(cases_of(data), map_batch, bs, request.device)
    return {**cm.compute(), **cm.counts(), "context": context}


def _option(request, name: str, default):
    """A method option's value, or ``default`` when it was not given (or the command does not declare it)."""
    value = request.options.get(name)
    return default if value is None else value


def _with_options(request, options: dict):
    import copy

    req = copy.copy(request)
    req.options = {**request.options, **options}
    return req


# ---------------------------------------------------------------------------------------------- registration


def _config_note(config: dict) -> str:
    """--print-config's line on which explain keys the run uses (the fast sampler replaces three of them)."""
    if config.get("explain", {}).get("sampler") != "fast":
        return "explain.sampler paper: the authors' loop at the model's explain.steps; provenance.json records what ran"
    return (f"explain.sampler fast: the run uses {FAST_TEXT}, not explain.steps / solver / reuse_inversion as "
            f"listed (those are --sampler paper's) unless you set them; provenance.json records what ran")


def _defaults(method: str) -> dict:
    d = deep_merge(DEFAULTS, {"explain": {"guidance": DEFAULT_GUIDANCE[method],
                                          "sampler": "fast" if method == "sanchez" else "paper"}})
    if method == "cdpm-classifier":
        d = deep_merge(d, {"explain": {"dn_percentile": 0.0}})
    if method == "cdpm-healthy":
        d = deep_merge(d, {"explain": {"dn_percentile": 0.0}})
    return d


def methods() -> list[Method]:
    out = []
    summaries = {
        "sanchez": "healthy counterfactuals by implicit guidance + attention conditioning (Sanchez et al. 2022)",
        "cdpm-healthy": "baseline: unconditional DDIM encode/decode of a DPM trained on healthy slices",
        "cdpm-classifier": "baseline: DPM + noise-aware classifier gradient guidance (Wolleb et al. 2022)",
    }
    for name, summary in summaries.items():
        sampling = _sampling_options(name)
        out.append(Method(
            name=name, summary=summary, capabilities={"train", "explain", "evaluate", "calibrate"},
            trainer=Trainer(name), sampler=Sampler(name), scorer=Scorer(name),
            conditioning=("label", "classifier-free") if name == "sanchez" else
            (("classifier",) if name == "cdpm-classifier" else ()),
            targets=("healthy",), defaults=_defaults(name), backends=("torch", "bf16", "onnx"), batch=True,
            options={"explain": sampling + EXPLAIN_EXTRA + DECISION_EXTRA + [SELF_CHECK],
                     "evaluate": sampling + EVAL_EXTRA + EXPLAIN_EXTRA[1:] + [SELF_CHECK],
                     "calibrate": sampling + EVAL_EXTRA + EXPLAIN_EXTRA[1:]},
            deterministic=dict.fromkeys(("explain", "evaluate", "calibrate"), f"the {name} counterfactual is deterministic "
                                                                  f"(DDIM encode/decode)"),
            config_note=_config_note,
        ))
    out.append(Method(
        name="threshold", summary="baseline: intensity thresholding of one channel (Meissen et al. 2021)",
        capabilities={"explain", "evaluate"}, sampler=Sampler("threshold"), scorer=Scorer("threshold"), batch=True,
        defaults=deep_merge({k: v for k, v in DEFAULTS.items() if k in ("preprocess", "explain")},
                            {"preprocess": thr.PREPROCESS}),
        options={"explain": [Option("batch_size", int, None, "slices per batch", bounds="[1, inf)")] + EXPLAIN_EXTRA
                 + thr.OPTIONS,
                 "evaluate": [Option("batch_size", int, None, "slices per batch", bounds="[1, inf)")] + EVAL_EXTRA
                 + EXPLAIN_EXTRA[1:] + thr.OPTIONS},
        deterministic=dict.fromkeys(("explain", "evaluate"), "threshold maps a channel's intensity (no randomness)"),
    ))
    return out

