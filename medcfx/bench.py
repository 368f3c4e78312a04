"""Timing of counterfactual sampling paths (used by ``medcfx bench`` and benchmarks/sampling.py).

A *path* is a way to run the encode + guided decode loop of one slice batch: the reference loop of the
authors' code (two separate forward passes per guided step, fp32, NCHW) or medcfx's (both branches in one
batched forward), optionally with channels_last, bf16 autocast, torch.compile or the ONNX backend, and with
the full or a reduced number of respaced steps. Every path returns its heatmaps so that paths can be
compared with the reference numerically, not only in speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from medcfx.diffusion import (
    InversionRecord,
    TorchDenoiser,
    classifier_free,
    decode,
    dynamic_normalise,
    encode,
    guidance_interval,
    static_clip,
)


@dataclass
class SamplingPath:
    name: str
    batched_cfg: bool = True
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    onnx: object = None  # an OnnxDenoiser
    steps: int | None = None  # None: the entry's / default steps
    solver: str = "ddim"  # or "dpm++2m" (same number of network calls per step)
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # cfg only where lo <= t / T <= hi (fractions of T)
    reuse_inversion: bool = False  # the decode's null branch from the encode (InversionRecord)


def _two_pass_cfg(den, w: float, null: int):
    """The authors' guided step: eps(null) and eps(healthy) as two separate forward passes."""

    def guided(x, t, cond):
        e_null = den(x, t, {**cond, "y": torch.full_like(cond["y"], null)})
        e_c = den(x, t, cond)
        return e_null + w * (e_c - e_null)

    return guided


def make_denoiser(unet, path: SamplingPath):
    if path.onnx is not None:
        return path.onnx
    module = unet
    if path.channels_last:  # a copy: the other paths keep the NCHW weights
        import copy

        module = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    if path.compile:
        module = torch.compile(module, dynamic=False)
    den = TorchDenoiser(module, autocast_bf16=path.bf16)
    if path.channels_last:
        inner = den

        def den(x, t, cond):  # noqa: F811 - channels_last input as well as weights
            return inner(x.contiguous(memory_format=torch.channels_last), t, cond)

    return den


def run_path(unet, schedule, x: torch.Tensor, path: SamplingPath, steps: int = 100, noise_level: float = 0.75,
             guidance: float = 3.0, dn_percentile: float = 0.99) -> torch.Tensor:
    """Heatmaps [B, H, W] of one encode/decode of ``x`` through ``path`` (CFG towards label 0)."""
    den = make_denoiser(unet, path)
    grid = schedule.respace(f"ddim{path.steps or steps}")
    L = grid.level_for_fraction(noise_level)
    proc = dynamic_normalise(dn_percentile) if dn_percentile > 0 else static_clip
    b = x.shape[0]
    if unet.config.num_classes:
        null = unet.null_label
        # labels on x's device: a CUDA module (and onnxruntime's CUDA IO binding) cannot read CPU indices
        record = InversionRecord(den) if path.reuse_inversion else den
        x_l = encode(record, x, grid, L, cond={"y": torch.full((b,), null, device=x.device)}, x0_process=proc,
                     solver=path.solver)
        if path.reuse_inversion:
            guided = record.guided(guidance, null)
        else:
            guided = classifier_free(den, guidance, null) if path.batched_cfg else _two_pass_cfg(den, guidance, null)
        lo, hi = path.guidance_interval
        if (lo, hi) != (0.0, 1.0):
            guided = guidance_interval(guided, den, lo * schedule.T, hi * schedule.T)
        x_cf = decode(guided, x_l, grid, L, cond={"y": torch.zeros(b, dtype=torch.long, device=x.device)},
                      x0_process=proc, solver=path.solver)
    else:
        x_l = encode(den, x, grid, L, x0_process=proc, solver=path.solver)
        x_cf = decode(den, x_l, grid, L, x0_process=proc, solver=path.solver)
    return (x - x_cf).abs().mean(1)


def forwards_per_slice(schedule, steps: int, noise_level: float, guided: bool,
                       interval: tuple[float, float] = (0.0, 1.0), reuse_inversion: bool = False,
                       solver: str = "ddim") -> int:
    """UNet evaluations per slice, counted on the respaced grid: L encode calls, then per decode step 2
    (both cfg branches) where guided and lo <= t / T <= hi, else 1; with ``reuse_inversion`` a guided step at a
    timestep the encode evaluated costs 1 (the DDIM encode evaluates every level's timestep; the multistep
    encode all but level L's)."""
    grid = schedule.respace(f"ddim{steps}")
    L = grid.level_for_fraction(noise_level)
    lo, hi = interval[0] * schedule.T, interval[1] * schedule.T
    seen = set(range(1, L + 1)) if solver == "ddim" else set(range(1, L))
    n = L
    for k in range(1, L + 1):
        two = guided and lo <= grid.t_of(k) <= hi and not (reuse_inversion and k in seen)
        n += 2 if two else 1
    return n


def time_path(unet, schedule, x, path: SamplingPath, repeats: int = 1, **kw) -> tuple[float, torch.Tensor]:
    """(seconds per slice, heatmaps) of the best of ``repeats`` runs (after one warm-up when compiling).

    ``x`` may live on a CUDA device (with ``unet`` there too): each timed run ends with a synchronize."""
    if path.compile:
        run_path(unet, schedule, x, path, **kw)
    best, maps = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        maps = run_path(unet, schedule, x, path, **kw)
        if maps.is_cuda:  # CUDA kernels run asynchronously: stop the clock when they are done
            torch.cuda.synchronize(maps.device)
        best = min(best, time.perf_counter() - t0)
    return best / x.shape[0], maps


def example_batch(unet, batch: int, seed: int = 0) -> torch.Tensor:
    """A deterministic image-like batch in [-1, 1] (blurred noise) of the network's input shape."""
    g = torch.Generator().manual_seed(seed)
    s, c = unet.config.image_size, unet.config.in_channels
    x = torch.nn.functional.avg_pool2d(torch.rand(batch, c, s + 6, s + 6, generator=g), 7, 1) * 2 - 1
    return x.clamp(-1, 1)


def bench(registry, ref: str, backends: list[str], batches: list[int], steps: int | None, repeats: int,
          console, solver: str = "ddim") -> list[dict]:
    """``medcfx bench``: seconds per slice, GFLOP/s and heatmap agreement of each path for a registered model.

    ``solver`` applies to every path but ``reference`` (the authors' DDIM loop), so "vs first path" also
    shows what the solver changes in the heatmap."""
    from rich.table import Table

    from medcfx.diffusion import Schedule
    from medcfx.diffusion.ddim import check_solver
    from medcfx.errors import UsageError
    from medcfx.loading import load_unet
    from medcfx.nn.flops import count_flops

    from medcfx.bench_volume import SAMPLER_METHODS

    check_solver(solver)  # before any model is loaded
    found = registry.resolve(ref)
    if found.method not in SAMPLER_METHODS:
        raise UsageError(f"bench times the encode / guided decode of {', '.join(SAMPLER_METHODS)} models; "
                         f"{found.ref} is a {found.method} model")
    unet, entry = load_unet(registry, ref)
    d = entry.config.get("diffusion", {"schedule": "linear", "T": 1000})
    schedule = Schedule.create(d["schedule"], d["T"])
    ex = entry.config.get("explain", {})
    kw = {"steps": int(steps or ex.get("steps", 100)), "noise_level": float(ex.get("noise_level", 0.75)),
          "guidance": float(ex.get("guidance", 3.0)), "dn_percentile": float(ex.get("dn_percentile", 0.99))}
    gflop = count_flops(unet, unet.onnx_inputs(1)[1]) / 1e9
    guided = bool(unet.config.num_classes)
    n_fwd = forwards_per_slice(schedule, kw["steps"], kw["noise_level"], guided)
    tag = "" if solver == "ddim" else f", {solver}"
    paths = []
    for b in backends:
        if b == "reference":
            paths.append(SamplingPath("reference (two passes, fp32)", batched_cfg=False))
        elif b == "torch":
            paths.append(SamplingPath(f"torch (batched cfg, fp32{tag})", solver=solver))
        elif b == "bf16":
            paths.append(SamplingPath(f"torch bf16 autocast{tag}", bf16=True, solver=solver))
        elif b == "onnx":
            from medcfx.export import OnnxDenoiser, verified_onnx_bytes

            if "onnx" not in entry.artifacts:
                raise UsageError(f"model {entry.ref} has no ONNX export: run `medcfx export {entry.ref} --format onnx`")
            paths.append(SamplingPath(f"onnxruntime (cpu{tag})", onnx=OnnxDenoiser(verified_onnx_bytes(registry, entry)),
                                      solver=solver))
        else:
            raise UsageError(f"unknown bench path {b!r} (reference, torch, bf16, onnx)")
    rows = []
    for batch in batches:
        x = example_batch(unet, batch)
        base = None
        for p in paths:
            sec, maps = time_path(unet, schedule, x, p, repeats, **kw)
            base = maps if base is None else base
            rows.append({"path": p.name, "batch": batch, "s_per_slice": sec, "forwards_per_slice": n_fwd,
                         "gflop_per_s": gflop * n_fwd / sec, "max_heatmap_diff": float((maps - base).abs().max())})
    table = Table(title=f"sampling speed of {entry.ref} ({gflop:.2f} GFLOP/forward, L={round(kw['noise_level'] * kw['steps'])} "
                        f"of {kw['steps']} steps, {torch.get_num_threads()} threads)")
    for c in ("path", "batch", "s/slice", "GFLOP/s", "vs first path"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["path"], str(r["batch"]), f"{r['s_per_slice']:.2f}", f"{r['gflop_per_s']:.0f}",
                      f"{r['max_heatmap_diff']:.1e}")
    console.print(table)
    return rows
