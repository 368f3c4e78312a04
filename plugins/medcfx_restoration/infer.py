"""Inference: restore images with one model or an ensemble of fold models, and turn them into anomaly maps.

Restoration (Baugh et al. 2024, sec. 2): start from pure noise and run DDPM ancestral sampling over the
respaced grid "ddimN" (N = ``steps``, default 50: timesteps 0, 20, ..., 980 of T = 1000, the grid of
diffusers' DDPMScheduler.set_timesteps(50) used by the authors), conditioning every step on the input
image (``cond_image``); x0 estimates are clipped to [-1, 1] (the DDPMScheduler default). The anomaly map is
1 - SSIM(restoration, input) (or |input - restoration|), zero in the background (``maps.anomaly_map``).

Reconstruction baseline (``recon-ddpm``): noise the input to level L = round(noise_level * N) of the same
grid (x_L = sqrt(abar_L) x + sqrt(1 - abar_L) eps) and denoise it with the unconditional model by
ancestral steps (DDIM with eta = 1, which is the DDPM posterior step) down to level 0.

Ensembles: several models (``--model a,b,c`` or a registered ensemble entry, see :func:`register_ensemble`)
each restore the image with their own noise; their maps are averaged pixel-wise (the paper's ensemble of
fold models). The restoration shown and written is the first member's.

Noise is drawn from a CPU generator seeded by (seed, member, batch start), so a run is reproducible for a
given batch size on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medcfx.data.preprocess import PreprocessConfig
from medcfx.diffusion import Schedule, decode, sample, static_clip
from medcfx.errors import MedcfxError, UsageError
from medcfx.loading import load_state
from medcfx.nn import UNet
from medcfx.train import generator

from .maps import MAP_KINDS, anomaly_map

METHOD = "restoration"
BASELINE = "recon-ddpm"


@dataclass
class Member:
    """One model of an ensemble: the registry entry it comes from, its artifact role and its network."""

    entry: object
    role: str
    ref: str
    model: UNet
    schedule: Schedule
    fold: int | None
    denoiser: object  # the denoiser contract for the chosen backend (torch, bf16 autocast or onnxruntime)
    intensity: str | None = None  # the 2D scaling rule it was trained with (volumes ignore it)


@dataclass(frozen=True)
class Params:
    steps: int = 50
    map: str = "ssim"
    noise_level: float = 0.5  # baseline only
    samples: int = 1  # restorations per model whose maps are averaged

    def check(self) -> "Params":
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if self.samples < 1:
            raise UsageError(f"--samples must be >= 1, got {self.samples}")
        if self.map not in MAP_KINDS:
            raise UsageError(f"--map must be one of {', '.join(MAP_KINDS)}, got {self.map!r}")
        if not 0 < self.noise_level <= 1:
            raise UsageError(f"--noise-level must be in (0, 1], got {self.noise_level}")
        return self


def split_refs(model: str | None, method: str) -> list[str]:
    """``--model REF[,REF...]`` -> refs (a method needs at least one; the baseline takes exactly one)."""
    if not model:
        raise UsageError(f"{method} needs --model REF[,REF...] (see `medcfx models list`)")
    refs = [r.strip() for r in model.split(",") if r.strip()]
    if not refs:
        raise UsageError(f"--model {model!r}: no model reference")
    if method == BASELINE and len(refs) > 1:
        raise UsageError(f"{BASELINE} takes one --model, got {len(refs)}")
    return refs


def _member_specs(registry, ref: str, method: str) -> list[tuple[object, str, dict]]:
    """(entry, artifact role, member config) for a model reference; an ensemble entry expands to its members."""
    entry = registry.resolve(ref)
    if entry.method != method:
        raise UsageError(f"model {entry.ref} was trained by method '{entry.method}', not '{method}'")
    members = entry.config.get("ensemble")
    if members:
        return [(entry, m["role"], m) for m in members]
    return [(entry, "weights", entry.config)]


def shared_preprocessing(pre: dict) -> str:
    """What the models of an ensemble must share: their preprocessing without the 2D scaling rule
    ``intensity`` (volumes ignore it; :meth:`Mapper.check_case` refuses 2D images when it differs)."""
    return str({**PreprocessConfig.from_dict(pre).to_dict(), "intensity": None})


def load_members(registry, refs: list[str], method: str, device: str, request=None) -> tuple[list[Member], dict]:
    """Load every model (weights sha256-verified by the registry); returns (members, preprocess config).
    All members must share one preprocessing (they see the same slices), except the 2D scaling rule
    ``intensity``, which volumes do not use (a model of an older medcfx records ``legacy``): such an ensemble
    explains volumes and refuses 2D images (:meth:`Mapper.check_case`). ``request`` chooses the backend
    (``--backend``, ``--bf16``; default torch fp32); an ONNX backend needs a single exported model."""
    from medcfx.diffusion import TorchDenoiser
    from medcfx.export import denoiser_for

    members, pre = [], None
    for ref in refs:
        for entry, role, spec in _member_specs(registry, ref, method):
            p = spec.get("preprocess") or entry.config.get("preprocess")
            if pre is None:
                pre = p
            elif shared_preprocessing(p) != shared_preprocessing(pre):
                raise UsageError(f"model {entry.ref} ({role}) was trained with other preprocessing than "
                                 f"{members[0].ref}; an ensemble needs one")
            model = UNet.from_config(spec["network"])
            load_state(model, registry.load_tensors(entry, role), f"{entry.ref} ({role})")
            d = spec["diffusion"]
            model = model.to(device).eval()
            if request is None:
                den = TorchDenoiser(model)
            elif entry.config.get("ensemble") and request.extra.get("backend") == "onnx":
                raise UsageError(f"--backend onnx: {entry.ref} is an ensemble entry; export its members and give "
                                 f"them as --model a,b")
            else:
                den = denoiser_for(request, entry, model)
            members.append(Member(entry, role, spec.get("ref", entry.ref), model,
                                  Schedule.create(d["schedule"], d["T"]), spec.get("fold"), den,
                                  PreprocessConfig.from_dict(p).intensity))  # a missing key: the default
    conditional = {m.model.config.cond_image_channels > 0 for m in members}
    if conditional != {method == METHOD}:
        raise UsageError(f"the models given are not {method} models (image conditioning mismatch)")
    return members, pre


def restore(member: Member, x: torch.Tensor, params: Params, gen: torch.Generator, method: str) -> torch.Tensor:
    """The restoration (or the baseline's reconstruction) of a batch x [B, C, S, S] in [-1, 1]."""
    den = member.denoiser
    grid = member.schedule.respace(f"ddim{params.steps}")
    if method == METHOD:
        out = sample(den, tuple(x.shape), grid, cond={"cond_image": x}, x0_process=static_clip, ddpm=True,
                     generator=gen, device=x.device)
    else:
        L = grid.level_for_fraction(params.noise_level)
        a = float(grid.abar[L])
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        x_l = (a ** 0.5) * x + ((1 - a) ** 0.5) * eps
        out = decode(den, x_l, grid, L, x0_process=static_clip, eta=1.0, generator=gen)
    return out.clamp(-1, 1)


class Mapper:
    """x [B, C, S, S] -> (first member's first restoration [B, C, S, S], mean anomaly map [B, S, S]).

    The map is the mean over the members (the paper's fold ensemble) and, with ``params.samples`` > 1, over that
    many restorations of each, each from its own noise (sample j of member k draws from the stream k + j n,
    n members), so one model with samples = K maps as the ensemble of K copies of it."""

    def __init__(self, members: list[Member], params: Params, seed: int, method: str):
        self.members = members
        self.params = params
        self.seed = seed
        self.method = method
        self.channels = members[0].model.config.in_channels

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, start: int = 0):
        if x.shape[1] != self.channels:
            raise UsageError(f"the model expects {self.channels} channel(s), the input has {x.shape[1]}")
        first, total, n = None, None, len(self.members)
        for j in range(self.params.samples):  # noise stream k + j n: sample j of member k
            for k, m in enumerate(self.members):
                r = restore(m, x, self.params, generator(self.seed, k + j * n, start), self.method)
                amap = anomaly_map(x, r, self.params.map)
                total = amap if total is None else total + amap
                first = r if first is None else first
        return first, total / (n * self.params.samples)

    def check_case(self, case):
        """``case``, or a MedcfxError naming it when it is a 2D image and the members scale 2D images by
        different rules (each would see the image scaled another way than in its training)."""
        rules = sorted({str(m.intensity) for m in self.members})
        if len(rules) > 1 and not case.is_volume:
            raise MedcfxError(f"{case.source}: the models of this ensemble scale 2D images by different rules "
                              f"({', '.join(rules)}); give volumes, or models trained with one rule")
        return case

    def describe(self) -> dict:
        return {"members": [{"model": m.ref, "role": m.role, "fold": m.fold, "sha256": m.entry.artifacts[m.role]["sha256"]}
                            for m in self.members]}


def register_ensemble(registry, refs: list[str], name: str, method: str = METHOD):
    """Register one entry holding the weights of several models (each becomes an artifact role: "weights"
    for the first, "member1", "member2", ... for the others), with each member's network, diffusion,
    preprocessing and fold in ``config.ensemble``; ``medcfx explain --model NAME`` then averages their maps."""
    specs = []
    for ref in refs:
        specs += _member_specs(registry, ref, method)
    if len(specs) < 2:
        raise UsageError("an ensemble needs at least two models")
    artifacts, members = {}, []
    for i, (entry, role, spec) in enumerate(specs):
        new_role = "weights" if i == 0 else f"member{i}"
        artifacts[new_role] = registry.artifact_path(entry, role)
        members.append({"role": new_role, "ref": spec.get("ref", entry.ref), "fold": spec.get("fold"),
                        "network": spec["network"], "diffusion": spec["diffusion"], "preprocess": spec["preprocess"]})
    pres = {shared_preprocessing(m["preprocess"]) for m in members}
    if len(pres) > 1:
        raise UsageError("the models of an ensemble must share one preprocessing")
    first = specs[0][0]
    config = {"ensemble": members, "preprocess": members[0]["preprocess"], "explain": first.config.get("explain", {})}
    return registry.register(name, method, artifacts, config=config,
                             provenance={"members": [m["ref"] for m in members]}, tags=["ensemble"])
