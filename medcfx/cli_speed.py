"""``medcfx export`` (the denoiser to ONNX, parity-gated) and ``medcfx bench`` (sampling speed here)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medcfx.errors import UsageError


def add_speed_commands(app: typer.Typer) -> None:
    """Add ``export`` and ``bench`` to the root app."""
    from medcfx.cli import _registry, console

    @app.command("export")
    def export_cmd(
        ref: str = typer.Argument(..., help="Registry reference of the model whose denoiser is converted."),
        fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
        opset: int = typer.Option(17, "--opset", help="ONNX opset."),
        dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="Dynamic batch axis."),
    ) -> None:
        """Export a model's denoiser network to ONNX and attach the .onnx file to the model in the registry (for
        `--backend onnx`); refused unless it matches torch (per call < 1e-4, heatmaps < 1e-3). A bundled model is
        first copied into your store as its next version. (To pack a model into a .tar archive for another
        machine: `medcfx models export REF OUT.tar`.)"""
        from medcfx.export import export_model

        if fmt != "onnx":
            raise UsageError(f"--format must be onnx, got {fmt!r}")

        def line(text: str) -> None:  # one line each, whatever the terminal width
            console.print(text, soft_wrap=True, highlight=False, markup=False)

        entry = export_model(_registry(), ref, opset=opset, dynamic_batch=dynamic_batch, log=line)
        info = entry.extra["export"]
        line(f"exported the denoiser of {entry.ref} to ONNX (sha256 {entry.artifacts['onnx']['sha256'][:12]}, "
             f"{entry.artifacts['onnx']['bytes']} bytes); parity per call {info['parity']['per_call_max_abs']:.1e}")


    @app.command("bench")
    def bench_cmd(
        ref: str = typer.Argument(..., help="Registry reference of the model to time."),
        backend: Optional[str] = typer.Option(None, "--backend", help="Comma-separated paths: reference, torch, bf16, "
                                                                     "onnx (default reference,torch,bf16); --volume: "
                                                                     "explain's backend, torch or onnx."),
        batch: Optional[str] = typer.Option(None, "--batch", help="Comma-separated batch sizes (default 1,8; "
                                                                  "--volume: one, default 8)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Respaced steps (default: the model's)."),
        repeats: int = typer.Option(1, "--repeats", help="Best of this many runs."),
        solver: Optional[str] = typer.Option(None, "--solver", help="ddim (default), dpm++2m or dpm++3m for every path "
                                                                   "but 'reference'; --volume: passed to explain."),
        volume: bool = typer.Option(False, "--volume", help="Time `medcfx explain` of one whole volume end to end "
                                                          "instead (per volume, per sampled slice, peak RSS)."),
        case: Optional[Path] = typer.Option(None, "--case", help="--volume: the case to explain (default: a "
                                                                "synthetic BraTS-sized 240x240x155 case)."),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="--volume: comma-separated explain samplers, "
                                                                     "one run each (default paper,fast)."),
    ) -> None:
        """Time counterfactual sampling of a model on this machine (seconds per slice, GFLOP/s, agreement), or with
        --volume one whole volume through `medcfx explain` per sampler."""
        from medcfx.bench import bench

        from medcfx.diffusion import SOLVERS
        from medcfx.method import check_bounds

        if solver is not None and solver not in SOLVERS:
            raise UsageError(f"--solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if not volume and (case is not None or sampler is not None):
            raise UsageError(f"{'--case' if case is not None else '--sampler'} applies with --volume only")
        if volume and repeats != 1:
            raise UsageError("--repeats applies to the slice bench, not to --volume (one explain run per sampler)")
        if volume:
            from medcfx.bench_volume import bench_volume

            sampler = sampler or "paper,fast"
            samplers = [s.strip() for s in sampler.split(",") if s.strip()]
            bad = [s for s in samplers if s not in ("paper", "fast")]
            if bad or not samplers:
                raise UsageError(f"--sampler expects a comma-separated list of paper, fast; got {sampler!r}")
            batch = batch or "8"
            if "," in batch:
                raise UsageError(f"--volume times one --batch size, got {batch!r}")
            try:
                b = int(batch)
            except ValueError:
                raise UsageError(f"--batch expects an integer, got {batch!r}") from None
            check_bounds("--batch", b, "[1, inf)")
            if backend is not None and backend not in ("torch", "onnx"):
                raise UsageError(f"--volume runs explain with one --backend, torch or onnx; got {backend!r}")
            extra = [*(["--steps", str(steps)] if steps is not None else []),
                     *(["--solver", solver] if solver is not None else [])]
            bench_volume(_registry(), ref, case, samplers, b, console, extra=extra, backend=backend)
            return

        batch, solver = batch or "1,8", solver or "ddim"
        try:
            batches = [int(b) for b in batch.split(",") if b.strip()]
        except ValueError:
            raise UsageError(f"--batch expects comma-separated integers, got {batch!r}") from None
        for b in batches:
            check_bounds("--batch", b, "[1, inf)")
        check_bounds("--repeats", repeats, "[1, inf)")
        if steps is not None:
            check_bounds("--steps", steps, "[1, inf)")
        backend = backend or "reference,torch,bf16"
        bench(_registry(), ref, [b.strip() for b in backend.split(",") if b.strip()], batches, steps, repeats, console,
              solver=solver)
