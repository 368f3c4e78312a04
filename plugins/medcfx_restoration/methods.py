"""The restoration plugin's methods: ``restoration`` (the paper) and ``recon-ddpm`` (its plain baseline).

``restoration``  image-conditioned DDPM trained on healthy slices to undo synthetic anomalies; explains an
                 image by restoring it from noise conditioned on it and comparing (1 - SSIM) (Baugh et al. 2024).
``recon-ddpm``   baseline: an unconditional DDPM on the same healthy slices; noise the input to a level and
                 denoise it (reconstruction-based anomaly detection).

Both write, per case: ``heatmap`` (the anomaly map) and ``counterfactual_<channel>`` (the restoration; one name per kind of output across methods, README "Outputs") (NIfTI on the input's grid for volumes,
.npy for 2D images), ``panels/slice_NNN.png`` and ``provenance.json``. ``evaluate`` reports image AP / AUROC
(score = mean of the map) and pixel AP / ideal Dice with the shared evaluation code.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from medcfx import figures
from medcfx.data.preprocess import PreprocessConfig
from medcfx.errors import UsageError
from medcfx.evaluation import calibrate_entry, cases_reader, evaluate_cases
from medcfx.batch import run_explain
from medcfx.inputs import OutputDir, write_map, write_native
from medcfx.scoring import decide, image_score, most_anomalous, native_map, operating_point
from medcfx.method import Method, Option
from medcfx.provenance import record, write_json
from medcfx.train import register_fit

from .config import DEFAULTS
from .infer import BASELINE, METHOD, Mapper, Params, load_members, split_refs
from .train import train_model

# ---------------------------------------------------------------------------------------------- options


def _sampling_options(method: str) -> list[Option]:
    opts = [
        Option("steps", int, None, "DDPM steps on the respaced grid (default 50)", bounds="[1, inf)"),
        Option("map", str, None, "anomaly map: ssim (1 - SSIM, the paper) or residual (|x - restoration|)",
               choices=("ssim", "residual")),
        Option("batch_size", int, None, "slices per batch (default 16)", bounds="[1, inf)"),
        Option("samples", int, None, "restorations per model, their maps averaged (default 1, the paper; each is "
               "one more full sampling run)", bounds="[1, inf)"),
    ]
    if method == BASELINE:
        opts.append(Option("noise_level", float, None, "noise level as a fraction of the steps (default 0.5)",
                           bounds="(0, 1]"))
    return opts


EXPLAIN_EXTRA = [
    Option("slice", int, None, "explain only this slice index of a volume (default: every slice)", bounds="[0, inf)"),
    Option("display", str, None, "channel shown in the PNG panels (default: the first)"),
]
# the panels' colour scales: one fixed range per kind of map, the same for every slice and case
# (docs/methods/restoration.md). 1 - SSIM: 0 (same local structure) to 1 (uncorrelated); on the bundled demo
# case the tumour averages 0.30. The residual is in the images' units, as sanchez's heatmap: 0 to 0.5.
MAP_SCALES = {"ssim": figures.MapScale("anomaly map = 1 - SSIM, channel mean", 1.0),
              "residual": figures.MapScale("anomaly map = mean |x - restoration| over channels (images in [-1, 1])",
                                           0.5)}
EVAL_EXTRA = [
    Option("slice_stride", int, 1, "score every k-th slice of each case (only those slices' voxels count)",
           bounds="[1, inf)"),
    Option("max_slices", int, 0, "score at most this many slices per case, spread evenly (0: all)", bounds="[0, inf)"),
]
DECISION_EXTRA = [
    Option("operating_point", str, None, "calibrated threshold for mask.nii.gz: fpr<N> (default) or valDice"),
    Option("min_size", int, 1, "smallest lesion component kept, in voxels (pixels in 2D)", bounds="[1, inf)"),
]


def _params(request) -> Params:
    ex = request.config["explain"]
    o = request.options

    def pick(name):
        return o.get(name) if o.get(name) is not None else ex[name]

    samples = o.get("samples") if o.get("samples") is not None else ex.get("samples", 1)  # older models: 1
    return Params(steps=int(pick("steps")), map=str(pick("map")), noise_level=float(pick("noise_level")),
                  samples=int(samples)).check()


def _batch_size(request) -> int:
    bs = int(request.options.get("batch_size") or request.config["explain"]["batch_size"])
    if bs < 1:
        raise UsageError(f"--batch-size must be >= 1, got {bs}")
    return bs


def _display_channel(channels: list[str], wanted: str | None) -> int:
    if wanted:
        if wanted not in channels:
            raise UsageError(f"--display {wanted}: the input's channels are {', '.join(channels)}")
        return channels.index(wanted)
    return 0


def _mapper(request, method: str) -> tuple[Mapper, PreprocessConfig]:
    members, pre = load_members(request.registry, split_refs(request.model, method), method, request.device,
                                request)
    return Mapper(members, _params(request), request.seed, method), PreprocessConfig.from_dict(pre)


# ---------------------------------------------------------------------------------------------- components


class Trainer:
    def __init__(self, method: str):
        self.method = method

    def train(self, request) -> dict:
        out = train_model(request, conditional=self.method == METHOD)
        result, run = out["result"], out["run"]
        if run is None:  # a non-zero DDP rank: rank 0 registers
            return {"printed": True}
        cfg = request.config
        config = {"network": out["net_cfg"], "diffusion": cfg["diffusion"], "preprocess": cfg["preprocess"],
                  "explain": cfg["explain"], "loss": cfg["loss"], "train": cfg["train"]}
        tags = []
        if self.method == METHOD:
            config.update(fold=out["fold"], train_tasks=list(out["train_tasks"]), val_tasks=list(out["val_tasks"]),
                          no_task_prob=cfg["no_task_prob"], anomalies=cfg["anomalies"], foreign=cfg["foreign"])
            tags = [f"fold{out['fold']}"]
        best = min((v for _, v in result.val), default=None)
        metrics = {"final_loss": result.final_loss, "best_val_loss": best, "weights": out["selected"],
                   "train_slices": out["train_slices"], "val_slices": out["val_slices"]}
        default = f"{self.method}-fold{out['fold']}" if self.method == METHOD else self.method
        entry = register_fit(request, result, default, config=config, metrics=metrics, tags=tags)
        return {"model": entry.ref, "run": str(run), "metrics": entry.metrics}


class Sampler:
    def __init__(self, method: str):
        self.method = method

    def explain(self, request) -> dict:
        mapper, pre = _mapper(request, self.method)
        bs = _batch_size(request)
        entry = _single_entry(request)
        point, said = operating_point(request, entry, mapper.params.__dict__, self.method)
        return run_explain(request, pre, mapper.channels, entry or mapper.members[0].entry,
                           lambda case: self._explain_case(request, mapper,
                                                           mapper.check_case(case).select(request.options.get("slice")),
                                                           bs, point),
                           {"method": self.method, "models": [m.ref for m in mapper.members], "out": str(request.out),
                            **said})

    def _explain_case(self, request, mapper: Mapper, case, bs: int, point) -> dict:
        show = _display_channel(case.channels, request.options.get("display"))
        x_all = torch.from_numpy(np.ascontiguousarray(case.images))
        restored, maps = [], []
        for i in range(0, len(x_all), bs):
            r, m = mapper(x_all[i:i + bs].to(request.device), start=i)
            restored.append(r.cpu())
            maps.append(m.cpu())
        rest = torch.cat(restored).numpy()
        amap = torch.cat(maps).numpy()
        label = "restoration" if self.method == METHOD else "reconstruction"
        amap_native = native_map(case, amap)
        decision = None
        if point is not None:
            decision = decide(case, amap_native, point[0], point[1], int(request.options.get("min_size") or 1))
        with OutputDir(request.out, case.id) as folder:
            write_native(case, folder, "heatmap", amap_native)
            if decision is not None:
                write_native(case, folder, "mask", decision.mask)
            for c, name in enumerate(case.channels):
                write_map(case, folder, f"counterfactual_{name}", (rest[:, c] + 1) / 2)
            scale = MAP_SCALES[mapper.params.map]
            figures.CasePanels(case, [("input", case.images[:, show]),
                                      (label if len(mapper.members) == 1 else f"{label} (model 1)", rest[:, show])],
                               amap_native, scale, channel=case.channels[show],
                               model=", ".join(m.ref for m in mapper.members),
                               map_title="1 - SSIM" if mapper.params.map == "ssim" else "|residual|", overlay=True,
                               decision=decision).write(folder)
            params = {"method": self.method, **mapper.params.__dict__, "batch_size": bs,
                      "backend": request.extra.get("backend", "torch"), "bf16": bool(request.extra.get("bf16")),
                      "display_channel": case.channels[show], "model_size": int(case.images.shape[-1]),
                      "panel_colour_scale": [scale.vmin, scale.vmax], **mapper.describe()}
            entry = mapper.members[0].entry
            write_json(folder / "provenance.json", record(request, entry, params, [case.source], case=case.id,
                                                          slices=[int(k) for k in case.slice_index], notes=case.notes,
                                                          decision=decision.to_dict() if decision else None,
                                                          image_score=image_score(case, amap_native),
                                                          most_anomalous_slice=most_anomalous(case, amap)))
        out = {"case": case.id, "slices": int(len(amap)), "score": float(amap.mean()),
               "most_anomalous_slice": most_anomalous(case, amap),
               "folder": str(request.out / case.id)}
        if decision is not None:
            out.update({"decision": decision.decision, "n_components": decision.n_components,
                        f"lesion_{decision.unit.replace('^', '')}": decision.lesion_size})
        return out


class Scorer:
    def __init__(self, method: str):
        self.method = method

    def evaluate(self, request) -> dict:
        return evaluate_cases(request, self.method, _single_entry(request),
                              *_scoring(request, self.method, request.options))

    def calibrate(self, request) -> dict:
        entry = _single_entry(request)
        if entry is None:
            raise UsageError(f"--model {request.model}: a calibration is stored with one model; register the "
                             f"members as one ensemble first (`medcfx restoration-ensemble`)")
        map_batch, cases_of, bs, context = _scoring(request, self.method, request.options)
        return calibrate_entry(request, self.method, entry, map_batch, cases_of, bs, context)


def _single_entry(request):
    """The registry entry of ``--model`` when it names one model (or one registered ensemble), else None."""
    if request.model is None or "," in request.model:
        return None
    return request.registry.resolve(request.model)


def _scoring(request, method: str, options: dict):
    """(map_batch, cases_of, batch size, settings) of one model (or ensemble) for :mod:`medcfx.scoring`."""
    req = copy.copy(request)
    req.options = {**request.options, **options}
    mapper, pre = _mapper(req, method)
    context = {"slice_stride": options.get("slice_stride") or 1, "max_slices": options.get("max_slices") or 0,
               **mapper.params.__dict__, **mapper.describe()}
    reader = cases_reader(pre, mapper.channels, options, log=request.note)
    return ((lambda x, start: mapper(x, start=start)[1]), lambda path: map(mapper.check_case, reader(path)),
            _batch_size(req), context)


# ---------------------------------------------------------------------------------------------- registration


def methods() -> list[Method]:
    out = []
    summaries = {
        METHOD: "anomaly maps from an image-conditioned DDPM trained to restore synthetic anomalies (Baugh et al. 2024)",
        BASELINE: "baseline: noise to a level and denoise with an unconditional DDPM trained on healthy slices",
    }
    for name, summary in summaries.items():
        sampling = _sampling_options(name)
        train_opts = [Option("fold", int, None, "cross-validation fold 0..9 (3 training, 2 validation tasks; default 0)",
                              bounds="[0, 9]")] \
            if name == METHOD else []
        defaults = DEFAULTS if name == METHOD else {
            k: v for k, v in DEFAULTS.items() if k not in ("fold", "no_task_prob", "anomalies", "foreign")}
        out.append(Method(
            name=name, summary=summary, capabilities={"train", "explain", "evaluate", "calibrate"},
            trainer=Trainer(name), sampler=Sampler(name), scorer=Scorer(name),
            conditioning=("image",) if name == METHOD else (), targets=("healthy",), defaults=defaults,
            backends=("torch", "bf16", "onnx"), batch=True,
            options={"train": train_opts, "explain": sampling + EXPLAIN_EXTRA + DECISION_EXTRA,
                     "evaluate": sampling + EVAL_EXTRA + EXPLAIN_EXTRA[1:],
                     "calibrate": sampling + EVAL_EXTRA + EXPLAIN_EXTRA[1:]},
        ))
    return out
