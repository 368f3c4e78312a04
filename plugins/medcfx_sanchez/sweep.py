"""``medcfx sweep``: ideal Dice over a grid of guidance scales and noise levels on a small annotated
validation set, and the recommended pair (Sanchez et al. 2022, sec. 4.3 and Fig. 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _floats(text: str, flag: str, bounds: str) -> list[float]:
    """Comma-separated finite numbers inside ``bounds``, all checked before the first evaluation runs."""
    from medcfx.errors import UsageError
    from medcfx.method import check_bounds

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    return [check_bounds(flag, v, bounds) for v in values]


def add_sweep_command(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        method: str = typer.Argument("sanchez", help="sanchez, cdpm-classifier or cdpm-healthy."),
        model: Optional[str] = typer.Option(None, "--model", help="Registry reference (default: the newest "
                                                                   "model of the method, yours before a bundled one)."),
        data: Path = typer.Option(..., "--data", help="Small annotated validation set."),
        guidance: str = typer.Option("1,3,5", "--guidance", help="Comma-separated guidance scales."),
        noise_level: str = typer.Option("0.5,0.75,1.0", "--noise-level", help="Comma-separated noise levels."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Respaced steps (default: the sampler's; 0.4 x the "
                                                                 "model's with the fast sampler)."),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="fast (sanchez's default) or paper (the "
                                                                     "authors' loop); docs/speed.md."),
        dn_percentile: Optional[float] = typer.Option(None, "--dn-percentile"),
        solver: Optional[str] = typer.Option(None, "--solver", help="ddim, dpm++2m or dpm++3m (default: the "
                                                                   "sampler's)."),
        max_slices: int = typer.Option(32, "--max-slices", help="Validation slices per case and setting, spread evenly (0: all)."),
        slice_stride: int = typer.Option(1, "--slice-stride"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        out: Path = typer.Option(Path("medcfx-sweep"), "--out", "-o"),
        device: str = typer.Option("auto", "--device"),
        backend: str = typer.Option("torch", "--backend", help="torch or onnx (after `medcfx export`)."),
        bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast for the torch backend."),
    ) -> None:
        """Sweep guidance scale x noise level on a validation set; report ideal Dice and recommend (w, L)."""
        from rich.table import Table

        from medcfx.cli import _backend, console, default_model, resolve_device
        from medcfx.cli_models import get_registry
        from medcfx.errors import UsageError
        from medcfx.evaluation import markdown_table
        from medcfx.method import Request, check_bounds
        from medcfx.validate import check_output_folder
        from medcfx.plugins import get_plugins
        from medcfx.provenance import write_json
        from medcfx.staging import atomic_write_bytes

        from .methods import _resolve_entry, run_evaluation

        m = get_plugins().method(method)
        if method not in ("sanchez", "cdpm-classifier", "cdpm-healthy"):
            raise UsageError(f"sweep applies to sanchez, cdpm-classifier and cdpm-healthy, not {method!r}")
        m.require_backend(_backend(backend), bf16)
        if not data.exists():
            raise UsageError(f"--data {data}: no such file or folder")
        ws, ls = _floats(guidance, "--guidance", "[0, inf)"), _floats(noise_level, "--noise-level", "(0, 1]")
        for flag, value, bounds in (("--steps", steps, "[1, inf)"), ("--dn-percentile", dn_percentile, "[0, 1)"),
                                    ("--max-slices", max_slices, "[0, inf)"), ("--slice-stride", slice_stride, "[1, inf)"),
                                    ("--batch-size", batch_size, "[1, inf)")):
            if value is not None:
                check_bounds(flag, value, bounds)
        check_output_folder(out, "--out")
        model = default_model(m, get_registry(), model)
        defaults = {k: v for k, v in m.defaults.items() if k != "presets"}
        request = Request(command="evaluate", method=m, config=defaults, model=model, data=data, out=out,
                          device=resolve_device(device), registry=get_registry(), console=console,
                          extra={"backend": _backend(backend), "bf16": bf16})
        entry = _resolve_entry(request, method)
        rows = []
        for w in ws:
            for level in ls:
                opts = {"guidance": w, "noise_level": level, "steps": steps, "dn_percentile": dn_percentile,
                        "solver": solver, "sampler": sampler, "max_slices": max_slices, "slice_stride": slice_stride,
                        "batch_size": batch_size}
                r = run_evaluation(request, method, entry, opts, data)
                settings = {k: v for k, v in r["context"].items() if k not in ("guidance", "noise_level")}
                rows.append({"guidance": w, "noise_level": level, "pixel_ideal_Dice": r["pixel_ideal_Dice_oracle"],
                             "pixel_AUPRC": r["pixel_AUPRC"], "cases": r["cases"]})
                console.print(f"w={w:g} L={level:g}: ideal Dice {rows[-1]['pixel_ideal_Dice']:.4f}, "
                              f"AUPRC {r['pixel_AUPRC']:.4f}")
        best = max(rows, key=lambda r: r["pixel_ideal_Dice"])
        table = Table(title=f"sweep of {entry.ref} on {data.name} (ideal Dice)")
        table.add_column("w \\ L")
        for level in ls:
            table.add_column(f"{level:g}")
        for w in ws:
            table.add_row(f"{w:g}", *(f"{r['pixel_ideal_Dice']:.4f}" for r in rows if r["guidance"] == w))
        console.print(table)
        console.print(f"recommended: --guidance {best['guidance']:g} --noise-level {best['noise_level']:g} "
                      f"(ideal Dice {best['pixel_ideal_Dice']:.4f})")
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "sweep.json", {"model": entry.ref, "data": str(data), "rows": rows, "recommended": best,
                                          "settings": settings})
        cols = ("guidance", "noise_level", "pixel_ideal_Dice", "pixel_AUPRC", "cases")
        atomic_write_bytes(out / "sweep.md", (f"# Sweep of {entry.ref} on {data}\n\n" + markdown_table(rows, cols)
                                              + f"\nRecommended: w = {best['guidance']:g}, L = {best['noise_level']:g}\n").encode())
