#!/usr/bin/env python
"""GPU check (issue 19, item 4): training and sampling speed of the sanchez paper network on one CUDA device.

Run through ``benchmarks/gpu_check.sh`` (which prepares the Python environment first); this file is the
driver and the stages. Stages, in order, each in its own forked process with its own time limit, so that one
that fails, crashes or hangs becomes a row with its reason and the others still run:

==================== =========================================================================================
env                  versions (torch, CUDA, cuDNN, onnxruntime and its providers, TensorRT), the GPU, and
                     which modules medcfx needs are missing
data                 ``medcfx data demo brain`` (procedural anatomy, offline)
train_fp32           ``medcfx train sanchez --preset paper`` for a fixed number of steps: steps/s after the
train_bf16           warm-up steps, samples/s, peak GPU memory; fp32, then ``train.bf16=true`` (autocast)
export               the paper UNet (fixed seeded weights, as benchmarks/sampling.py) to ONNX
sample_torch_fp32    one slice counterfactual (L = 75 of 100 DDIM steps, w = 3, dynamic normalisation) through
sample_torch_bf16    ``medcfx.bench.time_path``: s/slice and GFLOP/s at batch 1 and 8, and the max heatmap
sample_ort_cuda      difference against torch fp32; torch fp32, torch bf16 autocast, onnxruntime's CUDA provider
sample_ort_tensorrt  with IO binding (medcfx.export.OnnxDenoiser), onnxruntime's TensorRT provider (when present)
==================== =========================================================================================

``--dry`` runs the same stages on tiny sizes (a 16 x 16 network, 2 training steps, 4 sampling steps) on the
CPU, or on the GPU when there is one and ``--device cpu`` is not given: the torch rows run on that device, the
onnxruntime row runs the IO-binding code of OnnxDenoiser on CPU tensors with the CPU provider, and TensorRT
is skipped with its reason. Writes ``results.md``, ``results.json`` and ``stages.log`` (each stage's output)
to ``--out``, after every stage, so an interrupted run still leaves what it measured.

This module imports only the standard library at the top: it must report a broken environment, not die of it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import select
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("env", "data", "train_fp32", "train_bf16", "export", "sample_torch_fp32", "sample_torch_bf16",
          "sample_ort_cuda", "sample_ort_tensorrt")
MEASURED = {"train_fp32", "train_bf16", "sample_torch_fp32", "sample_torch_bf16", "sample_ort_cuda",
            "sample_ort_tensorrt"}
# each stage's own limit (seconds) on the GPU; the whole run's deadline shortens the later ones when needed
LIMITS = {"env": 60, "data": 90, "train_fp32": 120, "train_bf16": 120, "export": 90, "sample_torch_fp32": 60,
          "sample_torch_bf16": 60, "sample_ort_cuda": 90, "sample_ort_tensorrt": 150}
DRY_LIMIT = 120

# modules medcfx needs for these stages, and the stages that need each
NEEDED = {"torch": "all", "numpy": "all", "medcfx": "all", "typer": "data, train", "pluggy": "data, train",
          "rich": "data, train", "yaml": "train", "safetensors": "train", "nibabel": "data, train (NIfTI demo brains)",
          "PIL": "train", "sklearn": "train", "onnx": "export", "onnxruntime": "sample_ort_*"}

# a tiny network of the paper's architecture (attention conditioning, label tokens) for --dry
TINY_NETWORK = {"in_channels": 4, "out_channels": 4, "image_size": 16, "model_channels": 16, "channel_mult": [1, 2],
                "num_res_blocks": 1, "attention_resolutions": [8], "dropout": 0.0, "num_head_channels": 16,
                "num_classes": 2, "label_in_time_embedding": True, "attention_conditioning": True,
                "label_tokens": 4, "label_token_dim": 16, "num_groups": 8}


@dataclass(frozen=True)
class Sizes:
    """What each stage runs: the GPU sizes, or the tiny ones of --dry."""

    cases: int
    shape: tuple[int, int, int]
    train_steps: int
    log_every: int
    warmup_steps: int  # steps excluded from steps/s (allocation, autotuning)
    train_set: tuple[str, ...]  # extra --set values for `medcfx train`
    sample_steps: int
    batches: tuple[int, ...]
    repeats: int


GPU_SIZES = Sizes(cases=4, shape=(96, 96, 64), train_steps=50, log_every=10, warmup_steps=10, train_set=(),
                  sample_steps=100, batches=(1, 8), repeats=3)
DRY_SIZES = Sizes(cases=3, shape=(24, 24, 12), train_steps=2, log_every=1, warmup_steps=1,
                  train_set=tuple(f"network.{k}={json.dumps(v)}" for k, v in TINY_NETWORK.items())
                  + ("preprocess.size=16", "train.batch_size=4"),
                  sample_steps=4, batches=(1, 2), repeats=1)


class Skip(Exception):
    """A stage that cannot run here, with the reason (a row "skipped: reason", not an error)."""


class StageError(Exception):
    """A stage that failed for a reason it can state in one line."""


@dataclass
class Context:
    """What the stages share: sizes, folders, the device wanted, and what earlier stages produced."""

    dry: bool
    device: str  # "auto" or "cpu"
    work: Path
    sizes: Sizes
    outputs: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- helpers


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def cuda_device(ctx: Context) -> str:
    """The device of the measuring stages: cuda when present (and not --device cpu); without CUDA, cpu in
    --dry mode, else Skip (the GPU figures cannot be measured here)."""
    import torch

    if ctx.device != "cpu" and torch.cuda.is_available():
        return "cuda"
    if ctx.dry:
        return "cpu"
    raise Skip(f"no CUDA: torch {torch.__version__} sees no CUDA device")


def run_cli(args: list[str], log: Path) -> None:
    """``medcfx ARGS`` in this process (the real CLI); StageError with its error line when it exits non-zero."""
    from medcfx.cli import main

    try:
        main(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            sys.stdout.flush()
            sys.stderr.flush()
            lines = [s for s in log.read_text(errors="replace").splitlines() if "error" in s.lower()]
            raise StageError(f"medcfx {args[0]} {args[1]} exited with {exc.code}: "
                             f"{lines[-1].strip() if lines else 'see stages.log'}") from None


def bench_unet(ctx: Context):
    """The network timed by the sampling stages, in eval mode on the CPU: benchmarks/sampling.py's paper UNet
    (fixed seeded weights), or for --dry the tiny network with weights made the same way."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sampling import paper_unet  # also puts plugins/ on sys.path

    if not ctx.dry:
        return paper_unet()
    from medcfx.nn import UNet

    torch.manual_seed(0)
    unet = UNet(TINY_NETWORK).eval()
    with torch.no_grad():  # as paper_unet: zero-initialised output layers would make eps identically 0
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


# ---------------------------------------------------------------------------------------------- stages


def stage_env(ctx: Context) -> dict:
    """Versions, the GPU, and the modules medcfx needs that do not import here."""
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable}
    versions, missing = {}, []
    for mod, used_by in NEEDED.items():
        try:
            m = importlib.import_module(mod)
            versions[mod] = str(getattr(m, "__version__", "?"))
        except Exception as exc:  # ImportError, or a broken binary module
            missing.append(f"{mod} (needed by {used_by}): {one_line(exc)}")
    with contextlib.suppress(Exception):
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    if "onnxruntime" in versions:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if "medcfx" in versions:
        try:
            from medcfx.plugins import get_plugins

            if "sanchez" not in get_plugins().methods():
                missing.append("the medcfx_sanchez plugin (needed by train): not registered; install medcfx "
                               "(pip) so that its entry points exist")
        except Exception as exc:
            missing.append(f"medcfx plugins (needed by train): {one_line(exc)}")
    if "torch" in versions:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        info["cpu_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            info["compute_capability"] = f"{p.major}.{p.minor}"
    with contextlib.suppress(Exception):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    info["versions"] = versions
    info["missing"] = missing
    return {"info": info, "detail": f"{info.get('gpu') or 'no CUDA device'}; missing: {len(missing)} (see above)"}


def stage_data(ctx: Context) -> dict:
    """``medcfx data demo brain`` into the work folder (procedural anatomy: no template download)."""
    s = ctx.sizes
    out = ctx.work / "demo"
    run_cli(["data", "demo", "brain", "--out", str(out), "--cases", str(s.cases), "--opt",
             f"shape=[{','.join(map(str, s.shape))}]", "--opt", "anatomy=procedural"], ctx.work / "logs" / "data.log")
    return {"outputs": {"data": str(out)}, "detail": f"{s.cases} cases of {'x'.join(map(str, s.shape))}"}


def steady_rate(rows: list[dict], warmup: int) -> tuple[float, int]:
    """(steps/s, steps counted) from a metrics.jsonl's rows (each with ``step`` and ``it_s`` over the steps
    since the previous row), leaving out the steps up to ``warmup``."""
    steps, seconds, prev = 0, 0.0, 0
    for r in sorted((r for r in rows if "it_s" in r), key=lambda r: r["step"]):
        n = r["step"] - prev
        if prev >= warmup and r["it_s"] > 0:
            steps += n
            seconds += n / r["it_s"]
        prev = r["step"]
    if steps == 0:
        raise StageError(f"no training steps after the {warmup} warm-up steps were logged")
    return steps / seconds, steps


def stage_train(ctx: Context, bf16: bool) -> dict:
    """``medcfx train sanchez --preset paper`` for a fixed number of steps; steps/s after the warm-up."""
    import torch

    device = cuda_device(ctx)
    if "data" not in ctx.outputs:
        raise StageError("no demo data: the data stage did not finish")
    s = ctx.sizes
    tag = "bf16" if bf16 else "fp32"
    runs = ctx.work / f"runs-{tag}"
    sets = [f"train.steps={s.train_steps}", f"train.log_every={s.log_every}", f"train.ckpt_every={s.train_steps}",
            f"train.bf16={'true' if bf16 else 'false'}", "val_slices=0", *s.train_set]
    args = ["train", "sanchez", "--preset", "paper", "--data", ctx.outputs["data"], "--device", device,
            "--runs-dir", str(runs), "--name", f"gpu-check-{tag}"]
    for item in sets:
        args += ["--set", item]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_cli(args, ctx.work / "logs" / f"train_{tag}.log")
    logs = sorted(runs.glob("sanchez/*/v*/metrics.jsonl"))
    if not logs:
        raise StageError(f"the training run wrote no metrics.jsonl under {runs}")
    rows = [json.loads(line) for line in logs[-1].read_text().splitlines() if line.strip()]
    rate, counted = steady_rate(rows, s.warmup_steps)
    import yaml

    batch = int(yaml.safe_load((logs[-1].parent / "config.yaml").read_text())["config"]["train"]["batch_size"])
    loss = rows[-1].get("loss")
    if loss is None or not math.isfinite(loss):
        raise StageError(f"the last logged loss is {loss}")
    figures = [{"name": "steps/s", "value": rate, "unit": "steps/s",
                "detail": f"batch {batch}, steps {s.warmup_steps + 1}-{s.warmup_steps + counted} of {s.train_steps} "
                          f"({s.warmup_steps} warm-up steps left out), {'bf16 autocast' if bf16 else 'fp32'} on "
                          f"{device}, last loss {loss:.4f}"},
               {"name": "samples/s", "value": rate * batch, "unit": "samples/s", "detail": f"steps/s x {batch}"}]
    if device == "cuda":
        figures.append({"name": "peak GPU memory", "value": torch.cuda.max_memory_allocated() / 2**30, "unit": "GiB",
                        "detail": "torch.cuda.max_memory_allocated over the whole command"})
    return {"figures": figures}


def stage_export(ctx: Context) -> dict:
    """The sampling network as ONNX (medcfx.export.export_unet: named inputs, dynamic batch)."""
    from medcfx.export import export_unet

    path = ctx.work / "unet.onnx"
    names = export_unet(bench_unet(ctx), path)
    return {"outputs": {"onnx": str(path)}, "detail": f"inputs {', '.join(names)}; {path.stat().st_size / 2**20:.1f} MiB"}


def _stream_ordered(den):
    """A denoiser that runs ``den`` (an OnnxDenoiser) through its IO binding, after torch's queued work.

    On CUDA tensors it calls ``den`` (its own CUDA IO-binding path) once torch's current stream is done:
    onnxruntime computes on a stream of its own, which does not wait for the kernels that wrote x. On CPU
    tensors (--dry) it calls the same binding code with device "cpu"."""
    import torch

    def call(x, t, cond=None):
        if x.is_cuda:
            torch.cuda.current_stream(x.device).synchronize()
            return den(x, t, cond)
        return den._run_bound({"x": x, "t": t, **dict(cond or {})}, x, "cpu")

    return call


def ort_denoiser(ctx: Context, provider: str, device: str, names_hint: list[str]):
    """(denoiser, description) for onnxruntime's CUDA or TensorRT provider; Skip when it is not installed."""
    import onnxruntime as ort

    from medcfx.export import OnnxDenoiser

    if "onnx" not in ctx.outputs:
        raise StageError("no ONNX file: the export stage did not finish")
    path = ctx.outputs["onnx"]
    have = ort.get_available_providers()
    if provider == "tensorrt":
        if "TensorrtExecutionProvider" not in have:
            raise Skip(f"onnxruntime {ort.__version__} has no TensorrtExecutionProvider (it has {', '.join(have)})")
        if device != "cuda":
            raise Skip("no CUDA device")
        den = OnnxDenoiser(path, device="cuda")
        b = max(ctx.sizes.batches) * 2  # the guided decode evaluates both branches in one batch
        s, c = bench_image_shape(ctx)
        shapes = {"x": f"{{b}}x{c}x{s}x{s}", "t": "{b}", "y": "{b}"}
        profile = {k: ",".join(f"{n}:{shapes[n].format(b=v)}" for n in names_hint if n in shapes)
                   for k, v in (("trt_profile_min_shapes", 1), ("trt_profile_max_shapes", b),
                                ("trt_profile_opt_shapes", b))}
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(ctx.work / "trt-cache"), **profile}
        den.session = ort.InferenceSession(path, sess_options=opts, providers=[
            ("TensorrtExecutionProvider", trt), "CUDAExecutionProvider", "CPUExecutionProvider"])
        used = den.session.get_providers()
        if used[0] != "TensorrtExecutionProvider":
            raise StageError(f"the TensorRT provider did not load (session providers: {', '.join(used)})")
        den.cuda = True
        return _stream_ordered(den), f"TensorrtExecutionProvider (fp32/TF32, one profile up to batch {b}), IO binding"
    if device != "cuda":
        return _stream_ordered(OnnxDenoiser(path, device="cpu")), "dry: CPUExecutionProvider, IO binding on CPU tensors"
    if "CUDAExecutionProvider" not in have:
        raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (it has {', '.join(have)}): "
                   f"onnxruntime-gpu is not installed")
    den = OnnxDenoiser(path, device="cuda")
    if not den.cuda:
        raise StageError(f"the CUDA provider did not load (session providers: {', '.join(den.session.get_providers())})")
    return _stream_ordered(den), "CUDAExecutionProvider, IO binding (medcfx.export.OnnxDenoiser)"


def bench_image_shape(ctx: Context) -> tuple[int, int]:
    """(image size, channels) of the sampling network."""
    if ctx.dry:
        return TINY_NETWORK["image_size"], TINY_NETWORK["in_channels"]
    sys.path.insert(0, str(ROOT / "plugins"))
    from medcfx_sanchez.networks import PAPER_NETWORK

    return PAPER_NETWORK["image_size"], PAPER_NETWORK["in_channels"]


def stage_sample(ctx: Context, kind: str) -> dict:
    """One slice counterfactual through ``medcfx.bench.time_path``: s/slice and GFLOP/s per batch size, and
    the max heatmap difference against the torch fp32 stage's heatmaps (saved by that stage)."""
    import torch

    from medcfx.bench import SamplingPath, example_batch, forwards_per_slice, time_path
    from medcfx.diffusion import Schedule
    from medcfx.nn.flops import count_flops

    if kind == "ort_tensorrt":  # say first that the provider is missing, whatever the device
        import onnxruntime as ort

        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise Skip(f"onnxruntime {ort.__version__} has no TensorrtExecutionProvider "
                       f"(it has {', '.join(ort.get_available_providers())})")
    device = cuda_device(ctx)
    s = ctx.sizes
    unet = bench_unet(ctx)
    gflop = count_flops(unet, unet.onnx_inputs(1)[1]) / 1e9
    names = unet.onnx_inputs(1)[0]
    if kind in ("torch_fp32", "torch_bf16"):
        bf16 = kind == "torch_bf16"
        path = SamplingPath(f"torch {'bf16 autocast' if bf16 else 'fp32'}", bf16=bf16)
        what = f"torch {'bf16 autocast' if bf16 else 'fp32'} (batched CFG, medcfx.diffusion.TorchDenoiser)"
    else:
        den, what = ort_denoiser(ctx, "tensorrt" if kind == "ort_tensorrt" else "cuda", device, names)
        path = SamplingPath(what, onnx=den)
    unet.to(device)
    schedule = Schedule.create("linear", 1000)
    n_fwd = forwards_per_slice(schedule, s.sample_steps, 0.75, True)
    figures = []
    for b in s.batches:
        x = example_batch(unet, b).to(device)
        sec, maps = time_path(unet, schedule, x, path, repeats=s.repeats, steps=s.sample_steps)
        maps = maps.float().cpu()
        if not bool(torch.isfinite(maps).all()):
            raise StageError(f"non-finite heatmap values at batch {b}")
        ref = ctx.work / f"maps-{device}-b{b}.pt"
        if kind == "torch_fp32":
            torch.save(maps, ref)
        diff = float((maps - torch.load(ref)).abs().max()) if ref.exists() else None
        figures.append({"name": f"s/slice, batch {b}", "value": sec, "unit": "s/slice", "batch": b,
                        "gflop_per_s": gflop * n_fwd / sec, "max_heatmap_diff_vs_torch_fp32": diff,
                        "detail": f"{what} on {device}; {n_fwd} forwards/slice "
                                  f"(L = {round(0.75 * s.sample_steps)} of {s.sample_steps} DDIM steps, w = 3), "
                                  f"{gflop * n_fwd / sec:.3g} GFLOP/s, best of {s.repeats}"
                                  + (f", max heatmap diff vs torch fp32 {diff:.1e}" if diff is not None else "")})
    return {"figures": figures}


STAGE_FUNCS = {
    "env": stage_env,
    "data": stage_data,
    "train_fp32": lambda ctx: stage_train(ctx, bf16=False),
    "train_bf16": lambda ctx: stage_train(ctx, bf16=True),
    "export": stage_export,
    "sample_torch_fp32": lambda ctx: stage_sample(ctx, "torch_fp32"),
    "sample_torch_bf16": lambda ctx: stage_sample(ctx, "torch_bf16"),
    "sample_ort_cuda": lambda ctx: stage_sample(ctx, "ort_cuda"),
    "sample_ort_tensorrt": lambda ctx: stage_sample(ctx, "ort_tensorrt"),
}


# ---------------------------------------------------------------------------------------------- running a stage

_CHILDREN: set[int] = set()  # stage processes running now (each leads its own process group)


def _stop_children(signum, frame) -> None:
    """SIGTERM/SIGINT to the driver (the shell script's overall timeout): end the running stage's process
    group too, then exit; the reports written after the last finished stage stay."""
    for pid in list(_CHILDREN):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    os._exit(128 + signum)


def run_isolated(fn, ctx: Context, timeout: float, log: Path) -> dict:
    """Run ``fn(ctx)`` in a forked child (its own process group, output appended to ``log``) for at most
    ``timeout`` seconds. Returns ``fn``'s dict with status "ok", or status "skipped" / "error" / "timeout" /
    "crashed" with a one-line ``reason``; ``seconds`` is the wall time either way.

    The parent must not have initialised CUDA (a forked child could not use it); this driver never does."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.close(r)
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # also when sys.stdout was not fd 1
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            if ctx.dry:  # tiny tensors: one thread (several only wait on each other, badly on a busy machine)
                with contextlib.suppress(ImportError):
                    import torch

                    torch.set_num_threads(1)
            try:
                result = {"status": "ok", **(fn(ctx) or {})}
            except Skip as exc:
                result = {"status": "skipped", "reason": str(exc)}
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
                traceback.print_exc()
                reason = str(exc) if isinstance(exc, StageError) else one_line(exc)
                result = {"status": "error", "reason": reason}
            data = json.dumps(result, default=str).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    _CHILDREN.add(pid)
    with contextlib.suppress(OSError):  # also here, so that a kill right after the fork finds the group
        os.setpgid(pid, pid)
    os.close(w)
    chunks, timed_out = [], False
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(r)
    if timed_out:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    _CHILDREN.discard(pid)
    seconds = time.perf_counter() - t0
    if timed_out:
        return {"status": "timeout", "reason": f"stopped after its {timeout:.0f} s limit", "seconds": seconds}
    try:
        result = json.loads(b"".join(chunks).decode())
    except ValueError:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        how = f"killed by signal {sig}" if sig else f"exit status {os.WEXITSTATUS(status)}"
        return {"status": "crashed", "reason": f"the stage process ended without a result ({how})", "seconds": seconds}
    result["seconds"] = seconds
    return result


# ---------------------------------------------------------------------------------------------- reports


def _fmt(v: float) -> str:
    if v is None or not isinstance(v, (int, float)):
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def render_markdown(report: dict) -> str:
    """The results table (and the versions above it) as markdown."""
    env = report.get("env") or {}
    v = env.get("versions", {})
    lines = [f"# medcfx GPU check ({report['mode']})", "",
             f"- GPU: {env.get('gpu') or 'none'}" + (f" ({env['nvidia_smi']})" if env.get("nvidia_smi") else ""),
             f"- torch {v.get('torch', '-')} (CUDA {env.get('torch_cuda') or '-'}, cuDNN {env.get('cudnn') or '-'}, "
             f"TF32 {env.get('tf32', '-')}), onnxruntime {v.get('onnxruntime', '-')} "
             f"(providers: {', '.join(env.get('onnxruntime_providers', [])) or '-'}), "
             f"TensorRT {v.get('tensorrt', '-')}, medcfx {v.get('medcfx', '-')}, Python {env.get('python', '-')}",
             f"- missing: {'; '.join(env.get('missing', [])) or 'nothing'}",
             f"- setup: {report.get('setup') or '-'}",
             f"- command: `{report['command']}`; total {report['total_seconds']:.0f} s of a {report['budget_seconds']:.0f} s budget",
             "", "| stage | status | figure | value | unit | detail | wall s |", "|---|---|---|---|---|---|---|"]
    for st in report["stages"]:
        if st["status"] == "ok" and st.get("figures"):
            for f in st["figures"]:
                lines.append(f"| {st['stage']} | ok | {f['name']} | {_fmt(f['value'])} | {f['unit']} | "
                             f"{f.get('detail', '')} | {st['seconds']:.1f} |")
        else:
            detail = st.get("reason") or st.get("detail") or ""
            lines.append(f"| {st['stage']} | {st['status']} | - | - | - | {detail} | {st.get('seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def write_reports(out: Path, report: dict, work: Path) -> None:
    """results.json, results.md and stages.log (the stages' logs, in order) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "results.md").write_text(render_markdown(report))
    parts = []
    for st in report["stages"]:
        log = work / "logs" / f"{st['stage']}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        parts.append(f"===== {st['stage']} ({st['status']}) =====\n{text[-20000:]}")
    (out / "stages.log").write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run every stage within the deadline and write the reports; exit status 0 unless the driver itself failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where results.md / results.json / stages.log go")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (demo data, runs, ONNX file)")
    ap.add_argument("--dry", action="store_true", help="tiny sizes; CPU unless a GPU is there")
    ap.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: run --dry on the CPU even with a GPU")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run, setup included")
    ap.add_argument("--started", type=float, default=None, help="epoch seconds the run (setup included) started")
    ap.add_argument("--setup-note", default="", help="what the shell script did to get this Python environment")
    ap.add_argument("--only", default="", help="comma-separated stages to run (the others are skipped)")
    ap.add_argument("--command", default=None, help="the command line to show in the results")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.dry:
        ap.error("--device cpu is for --dry runs: the full run measures the GPU")
    started = args.started or time.time()
    deadline = started + args.budget - 15  # time to write the reports and exit
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    os.environ["MEDCFX_HOME"] = str(work / "home")
    os.environ["MEDCFX_CACHE"] = str(work / "cache")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # imported once here (CUDA untouched), so each forked stage starts without paying the imports again
    for mod in ("torch", "onnxruntime", "medcfx.cli", "medcfx.bench", "medcfx.export"):
        with contextlib.suppress(Exception):
            importlib.import_module(mod)
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and torch_mod.cuda.is_initialized():  # never expected: the stages would fail
        args.setup_note += "; CUDA was initialised in the driver process, so forked stages cannot use it"
    signal.signal(signal.SIGTERM, _stop_children)
    signal.signal(signal.SIGINT, _stop_children)
    ctx = Context(dry=args.dry, device=args.device, work=work, sizes=DRY_SIZES if args.dry else GPU_SIZES)
    only = {s for s in args.only.split(",") if s}
    command = args.command or " ".join([sys.executable, *sys.argv])
    report = {"mode": "dry" if args.dry else "gpu", "command": command,
              "setup": args.setup_note, "budget_seconds": args.budget, "total_seconds": 0.0, "env": None,
              "stages": []}
    for name in STAGES:
        left = deadline - time.time()
        limit = min(DRY_LIMIT if args.dry else LIMITS[name], left)
        if only and name not in only:
            result = {"status": "skipped", "reason": "not in --only", "seconds": 0.0}
        elif limit < 5:
            result = {"status": "skipped", "reason": f"out of time ({args.budget:.0f} s budget)", "seconds": 0.0}
        else:
            result = run_isolated(STAGE_FUNCS[name], ctx, limit, work / "logs" / f"{name}.log")
        ctx.outputs.update(result.pop("outputs", {}) or {})
        if name == "env" and "info" in result:
            report["env"] = result.pop("info")
        report["stages"].append({"stage": name, **result})
        report["total_seconds"] = time.time() - started
        write_reports(args.out, report, work)
        print(f"{name}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else "")
              + "".join(f"; {f['name']} {_fmt(f['value'])} {f['unit']}" for f in result.get("figures", [])), flush=True)
    with contextlib.suppress(BrokenPipeError):
        print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
