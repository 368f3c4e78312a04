"""One training loop for every method.

``fit`` runs AdamW with an EMA copy of the weights, optional bf16 autocast, gradient clipping, periodic
atomic checkpoints and exact ``--resume``. It runs unchanged under ``torchrun`` (DistributedDataParallel,
gloo on CPU, nccl on GPU); rank 0 alone writes files.

Reproducibility contract: the global batch of step ``s`` and every sample's noise and timestep are drawn
from generators seeded by ``(seed, step, position in the global batch)``, never from a shared stream. So a
run on 2 processes and a run on 1 process with the same global batch see the same samples and the same
noise, and a resumed run continues the exact trajectory of an uninterrupted one (the global torch RNG, used
by dropout, is checkpointed too).

A method supplies ``loss_fn(model, batch) -> (loss, logs)``; ``batch`` is a :class:`Batch` holding the
dataset indices this process must use plus per-sample random draws.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import medcfx
from medcfx import staging
from medcfx.errors import MedcfxError, UsageError
from medcfx.train_announce import PROBE_STEPS, PlainProgress, announce, say
from medcfx.train_loggers import open_logger

CHECKPOINTS_KEPT = 2


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global batch, split across processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + step) / (10 + step))
    grad_clip: float = 1.0  # 0 disables
    bf16: bool = False
    warmup_steps: int = 0  # linear learning-rate warm-up
    log_every: int = 10
    ckpt_every: int = 500
    val_every: int = 0  # 0: validate only at the end (when a val_fn is given)
    early_stopping: int = 0  # stop after this many validations without improvement (0: off)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config of a ``train:`` section; UsageError naming the key for an unknown key or a value out
        of range (steps and batch_size >= 1, lr > 0, ema_decay in [0, 1], log/checkpoint intervals >= 1)."""
        from medcfx.method import check_bounds

        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UsageError(f"unknown training option(s) {sorted(unknown)} (known: {sorted(names)})")
        cfg = cls(**d)
        for name, bounds in _TRAIN_BOUNDS.items():
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"train.{name} must be a number, got {value!r}")
            check_bounds(f"train.{name}", value, bounds)
        return cfg


_TRAIN_BOUNDS = {"steps": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)", "weight_decay": "[0, inf)",
                 "ema_decay": "[0, 1]", "grad_clip": "[0, inf)", "warmup_steps": "[0, inf)", "log_every": "[1, inf)",
                 "ckpt_every": "[1, inf)", "val_every": "[0, inf)", "early_stopping": "[0, inf)"}


# ----------------------------------------------------------------------------------------------------------
# distributed helpers


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a 1-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# deterministic per-sample randomness


def _seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64), independent for nearby inputs."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed_of(*parts))
    return g


@dataclass
class Batch:
    """What one process trains on at one step: dataset ``indices`` and their positions in the global batch.

    The random draws are per sample and depend only on ``(seed, step, position)``.
    """

    step: int
    seed: int
    indices: torch.Tensor  # int64 [b] dataset indices for this process
    positions: torch.Tensor  # int64 [b] positions in the global batch
    device: torch.device = torch.device("cpu")
    _gens: list = field(default_factory=list, repr=False)

    def _generators(self) -> list[torch.Generator]:
        if not self._gens:
            self._gens = [generator(self.seed, self.step, int(p), 1) for p in self.positions]
        return self._gens

    def randn(self, *shape: int) -> torch.Tensor:
        """Per-sample standard normal draws, stacked to [b, *shape]."""
        out = torch.stack([torch.randn(shape, generator=g) for g in self._generators()])
        return out.to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        out = torch.stack([torch.rand(shape, generator=g) for g in self._generators()])
        return out.to(self.device)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        out = torch.stack([torch.randint(high, shape, generator=g) for g in self._generators()])
        return out.to(self.device)

    def __len__(self) -> int:
        return len(self.indices)


def uniform_batches(num_samples: int) -> Callable[[int, int, int], torch.Tensor]:
    """Global batch sampler: ``batch_size`` indices drawn uniformly with replacement, seeded by the step."""
    if num_samples < 1:
        raise MedcfxError("the training set is empty")

    def draw(seed: int, step: int, batch_size: int) -> torch.Tensor:
        return torch.randint(num_samples, (batch_size,), generator=generator(seed, step, 0))

    return draw


def balanced_batches(labels) -> Callable[[int, int, int], torch.Tensor]:
    """Class-balanced global batches: each sample's class is drawn uniformly, then a member of that class.

    ``labels`` is an int array [N] (one class per sample). Classes with no member are skipped.
    """
    labels = torch.as_tensor(labels).long()
    groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    groups = [g for g in groups if len(g)]
    if not groups:
        raise MedcfxError("the training set is empty")

    def draw(seed: int, step: int, batch_size: int) -> torch.Tensor:
        g = generator(seed, step, 0)
        cls = torch.randint(len(groups), (batch_size,), generator=g)
        pick = torch.rand(batch_size, generator=g)
        return torch.stack([groups[c][int(p * len(groups[c]))] for c, p in zip(cls.tolist(), pick)])

    return draw


# ----------------------------------------------------------------------------------------------------------
# run folders


def _safe_part(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._")
    return keep or "data"


def new_run_dir(runs_dir: Path, method: str, dataset: str) -> Path:
    """Create runs/<method>/<dataset>/vN (N auto-increments) and point the ``latest`` link at it."""
    base = Path(runs_dir) / _safe_part(method) / _safe_part(dataset)
    base.mkdir(parents=True, exist_ok=True)
    staging.sweep(base)
    versions = [int(p.name[1:]) for p in base.glob("v*") if p.name[1:].isdigit()]
    n = max(versions, default=0) + 1
    while True:
        run = base / f"v{n}"
        try:
            run.mkdir()
            break
        except FileExistsError:
            n += 1
    _relink(base / "latest", run.name)
    return run


def latest_run_dir(runs_dir: Path, method: str, dataset: str) -> Path:
    base = Path(runs_dir) / _safe_part(method) / _safe_part(dataset)
    link = base / "latest"
    staging.sweep(base)
    if not link.exists():
        raise UsageError(f"--resume: no earlier run of '{method}' on '{dataset}' under {base}")
    return link.resolve()


def _relink(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` atomically (a staged link renamed over the old one)."""
    tmp = staging.staging_path(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# checkpoints: safetensors for tensors, JSON for the rest; written to a temp folder and renamed


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run: Path, step: int, model, ema, opt, extra: dict, tag: str | None = None) -> Path:
    ckdir = run / "checkpoints"
    name = tag or f"step-{step:08d}"
    final = ckdir / name
    with staging.staged_folder(final) as tmp:  # complete or absent, whenever the process dies
        save_file(_state_tensors(model), str(tmp / "model.safetensors"))
        save_file(_state_tensors(ema), str(tmp / "ema.safetensors"))
        opt_t, opt_meta = _optimizer_tensors(opt)
        opt_t["rng.torch"] = torch.get_rng_state()
        save_file(opt_t, str(tmp / "optim.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **extra}, indent=1))
    if tag is None:
        _relink(ckdir / "latest", name)
        steps = sorted(p for p in ckdir.glob("step-*") if p.is_dir())
        for old in steps[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, ema, opt) -> dict:
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        tensors = load_file(str(path / "optim.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise MedcfxError(f"cannot resume from {path}: {str(exc).splitlines()[0]}") from None
    torch.set_rng_state(tensors.pop("rng.torch"))
    _load_optimizer(opt, tensors, state["optimizer"])
    return state


# ----------------------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@dataclass
class FitResult:
    run: Path
    step: int
    ema: torch.nn.Module
    losses: list[tuple[int, float]]
    val: list[tuple[int, float]]
    seconds: float
    stopped_early: bool = False

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else math.nan


def _read_log(path: Path, upto: int) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if row.get("step", 0) <= upto:
                    rows.append(row)
    return rows


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict]],
    draw_batch: Callable[[int, int, int], torch.Tensor],
    cfg: TrainConfig,
    run: Path | None,
    *,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
    param_groups: list[dict] | None = None,
    val_fn: Callable[[torch.nn.Module], float] | None = None,
    progress: bool = True,
    dist_info: Dist | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps; returns the EMA model and the loss history.

    ``draw_batch(seed, step, global_batch) -> indices`` picks the global batch (see ``uniform_batches``,
    ``balanced_batches``). ``param_groups`` overrides the optimiser groups (e.g. a separate learning rate
    for a classifier head); by default all parameters share ``cfg.lr``. ``val_fn(ema_model) -> loss`` runs
    every ``cfg.val_every`` steps (and at the end); the best EMA weights by validation are kept as the
    ``best`` checkpoint and, with ``cfg.early_stopping``, training stops after that many validations
    without improvement.

    Before the long part, the main process prints one line (:func:`announce`): the preset the run was started
    with (read from the run folder's config.yaml), the network's parameter count, and the speed measured over
    the :data:`PROBE_STEPS` steps after the first (which warms up) with the time the remaining steps will
    take. It goes to ``log`` when given, else above the progress bar, else to stderr.
    """
    d = dist_info or init_distributed(device)
    dev = torch.device(device)
    torch.manual_seed(seed)  # global stream (dropout); restored exactly on resume
    model.to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g.setdefault("base_lr", g["lr"])
    step = 0
    losses: list[tuple[int, float]] = []
    val_hist: list[tuple[int, float]] = []
    best_val, since_best = math.inf, 0
    if run is None and d.main:
        raise MedcfxError("internal: the main process needs a run folder")
    log_path = run / "metrics.jsonl" if run is not None else None
    if d.main:
        staging.sweep(run / "checkpoints")  # what a killed earlier process of this run left half-written
    if resume:
        latest = run / "checkpoints" / "latest"
        if not latest.exists():
            raise UsageError(f"--resume: {run} has no checkpoint yet")
        state = load_checkpoint(latest.resolve(), model, ema, opt)
        step = state["step"]
        best_val, since_best = state.get("best_val", math.inf), state.get("since_best", 0)
        rows = _read_log(log_path, step) if log_path else []
        losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val_hist = [(r["step"], r["val"]) for r in rows if "val" in r]
        if d.main:  # drop what was logged after the checkpoint, so the log is one consistent trajectory
            log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if dev.type == "cuda" else None)
    if cfg.batch_size % d.world:
        raise UsageError(f"batch size {cfg.batch_size} is not divisible by the {d.world} processes")
    local = cfg.batch_size // d.world
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()

    bar = None
    plain = PlainProgress(cfg.steps, step) if progress and d.main and not sys.stdout.isatty() else None
    if progress and d.main and plain is None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.2f} it/s"),
            TimeRemainingColumn(), transient=False,
        )
        task = bar.add_task("train", total=cfg.steps, completed=step, loss=math.nan, ips=0.0)
        bar.start()
    t0 = time.perf_counter()
    t_last, step_last = t0, step
    announced = not d.main
    probe_t, probe_step, first_s = 0.0, -1, 0.0  # the clock and step after this session's first step
    stopped = False
    log_file = open(log_path, "a") if d.main else None
    sink = open_logger(run) if d.main else None  # TensorBoard / MLflow when the run was started with --logger
    model.train()
    try:
        while step < cfg.steps:
            idx = draw_batch(seed, step, cfg.batch_size)
            pos = torch.arange(d.rank * local, (d.rank + 1) * local)
            batch = Batch(step=step, seed=seed, indices=idx[pos], positions=pos, device=dev)
            scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            with autocast:
                loss, logs = loss_fn(net, batch)
            if not torch.isfinite(loss):
                raise MedcfxError(f"training diverged at step {step}: loss is {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
            ema_update(ema, model, decay)
            step += 1
            value = float(loss.detach())
            if d.world > 1:
                t = torch.tensor([value], dtype=torch.float64)
                dist.all_reduce(t)
                value = float(t) / d.world
            losses.append((step, value))
            if plain is not None:
                plain.tick(step, value)
            if not announced:
                now = time.perf_counter()
                if probe_step < 0:
                    probe_t, probe_step, first_s = now, step, now - t0
                if step - probe_step >= PROBE_STEPS or step == cfg.steps:
                    timed = step - probe_step  # 0 when the run had a single step left: that step is timed
                    rate = timed / max(now - probe_t, 1e-9) if timed else 1 / max(first_s, 1e-9)
                    say(announce(model, cfg, run, step, rate, timed or 1, device), log, bar)
                    announced = True
            if log_file is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                now = time.perf_counter()
                ips = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                row = {"step": step, "loss": value, "lr": opt.param_groups[0]["lr"], "it_s": ips}
                row.update({k: float(v) for k, v in logs.items()})
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                if sink is not None:
                    sink.log(step, row)
                if bar is not None:
                    bar.update(task, completed=step, loss=value, ips=ips)
            validate = val_fn is not None and (
                step == cfg.steps or (cfg.val_every and step % cfg.val_every == 0)
            )
            if validate:
                v = float(val_fn(ema))
                val_hist.append((step, v))
                if log_file is not None:
                    log_file.write(json.dumps({"step": step, "val": v}) + "\n")
                    log_file.flush()
                if sink is not None:
                    sink.log(step, {"val": v})
                if v < best_val:
                    best_val, since_best = v, 0
                    if d.main:
                        save_checkpoint(run, step, model, ema, opt, {"best_val": v}, tag="best")
                else:
                    since_best += 1
                    if cfg.early_stopping and since_best >= cfg.early_stopping:
                        stopped = True
            if d.main and (step % cfg.ckpt_every == 0 or step == cfg.steps or stopped):
                save_checkpoint(run, step, model, ema, opt, {"best_val": best_val, "since_best": since_best})
                write_progress(run, losses, val_hist)  # progress.png follows the run, one redraw per checkpoint
            if stopped:
                break
    finally:
        if bar is not None:
            bar.stop()
        if log_file is not None:
            log_file.close()
        if sink is not None:
            sink.close()
    barrier(d)
    seconds = time.perf_counter() - t0
    if d.main:
        _write_summary(run, step, losses, val_hist, seconds, stopped)
    model.eval()
    return FitResult(run, step, ema, losses, val_hist, seconds, stopped)


def _write_summary(run: Path, step: int, losses, val_hist, seconds: float, stopped: bool) -> None:
    tail = [v for _, v in losses[-50:]]
    summary = {
        "steps": step,
        "seconds_this_session": round(seconds, 2),
        "final_loss": losses[-1][1] if losses else None,
        "mean_loss_last_50": sum(tail) / len(tail) if tail else None,
        "best_val": min((v for _, v in val_hist), default=None),
        "stopped_early": stopped,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    write_progress(run, losses, val_hist)


def write_progress(run: Path, losses, val_hist) -> Path:
    """RUN/progress.png: the training loss (and the validation loss when there is one) against the step,
    with labelled axes (:func:`medcfx.figures.training_plot`; about 0.1 s, redrawn at every checkpoint)."""
    from medcfx.figures import training_plot

    return training_plot(losses, val_hist, run / "progress.png",
                         title=f"{run.parent.parent.name}/{run.parent.name}/{run.name}")


# ----------------------------------------------------------------------------------------------------------
# the glue a method's trainer uses around ``fit``


def start_run(request, dataset: str | None = None) -> Path | None:
    """The run folder for ``request``: a new runs/<method>/<dataset>/vN, or the latest one with --resume.

    The resolved config is written next to the checkpoints as config.yaml (on a resume it must match the
    saved one: a resumed run with a different config would not be the same run). The record holds the
    data folder as an absolute path and the ``--preset`` (null: none, the method's defaults).
    """
    import yaml

    if isinstance(request.config.get("train"), dict):
        TrainConfig.from_dict(request.config["train"])  # a bad value is refused before the folder exists
    dataset = dataset or Path(request.data).name or "data"
    record = {"method": request.method.name, "data": _absolute(request.data), "seed": request.seed,
              "preset": (request.extra or {}).get("preset"), "logger": (request.extra or {}).get("logger"),
              "options": request.options, "config": request.config}
    if request.resume:
        run = latest_run_dir(request.runs_dir, request.method.name, dataset)
        saved = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else None
        if saved is not None and yaml.safe_dump(saved.get("config")) != yaml.safe_dump(request.config):
            raise UsageError(f"--resume: the config differs from the one saved in {run / 'config.yaml'}")
        return run
    if int(os.environ.get("RANK", "0")) != 0:
        return None  # only rank 0 writes; fit() takes run=None on the other ranks
    run = new_run_dir(request.runs_dir, request.method.name, dataset)
    (run / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    return run


def _absolute(path) -> str | None:
    """``path`` resolved to an absolute path (symlinks followed) as a string; None stays None."""
    return None if path is None else str(Path(path).expanduser().resolve())


def data_fingerprint(path: Path) -> str:
    """sha256 over the relative paths, sizes and mtimes of every file under ``path`` (or of the file)."""
    import hashlib

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = f.name if f == path else str(f.relative_to(path))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def register_fit(request, result: FitResult, default_name: str, config: dict, metrics: dict | None = None,
                 artifacts: dict[str, Path] | None = None, tags=(), modules: dict | None = None):
    """Save the EMA weights of a finished ``fit`` as safetensors and register them.

    ``modules`` maps extra artifact roles to modules whose state is saved too (e.g. a classifier head).
    Returns the registry entry. The provenance records the data and the run folder as absolute paths
    (a relative ``brain/`` would mean nothing once the shell has moved on).
    """
    run = result.run
    weights = run / "model.safetensors"
    save_file(_state_tensors(result.ema), str(weights))
    arts = {"weights": weights, **(artifacts or {})}
    for role, module in (modules or {}).items():
        path = run / f"{role}.safetensors"
        save_file(_state_tensors(module), str(path))
        arts[role] = path
    provenance = {
        "data": _absolute(request.data),
        "data_fingerprint": data_fingerprint(request.data) if request.data else None,
        "steps": result.step,
        "seed": request.seed,
        "medcfx_version": medcfx.__version__,
        "run": _absolute(run),
        "train_seconds": round(result.seconds, 1),
        "preset": request.extra.get("preset"),
    }
    entry = request.registry.register(
        request.name or default_name, request.method.name, arts, config=config, provenance=provenance,
        metrics=metrics or {}, tags=list(tags),
    )
    request.log(f"registered {entry.ref} (sha256 {entry.digest[:12]}) from {run}")
    return entry
