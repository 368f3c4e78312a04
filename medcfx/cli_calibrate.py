"""``medcfx calibrate REF --data VAL/``: operating points of a map-producing model, stored with it.

The thresholds (:mod:`medcfx.operating_points`: at a target false-positive rate on healthy validation
voxels, and the best validation Dice when the validation set is annotated) are computed from the model's
maps on the validation cases' own grids (:mod:`medcfx.scoring`) and stored as a new version of the model
(``calibration`` and the sampling settings it holds for), which ``explain`` then uses for mask.nii.gz, the
lesion volume and the decision, and ``evaluate`` for the Dice at each operating point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
FPR_HELP = "target false-positive rate on healthy validation voxels, a fraction in (0, 1)"
HEALTHY_HELP = "count every validation case without a lesion mask as healthy (otherwise such a case is refused)"


def check_calibration_options(fpr: float, n_resamples: int | None = None) -> None:
    """UsageError for an ``--fpr`` outside (0, 1) or a negative ``--n-resamples``."""
    from medcfx.method import check_bounds

    check_bounds("--fpr", float(fpr), "(0, 1)")
    if n_resamples is not None:
        check_bounds("--n-resamples", int(n_resamples), "[0, inf)")


def add_calibrate_command(app: typer.Typer) -> None:
    """Add ``calibrate`` and ``report`` to the root app."""

    @app.command()
    def report(out: Path = typer.Argument(..., help="An explain or evaluate output folder.")) -> None:
        """Write OUT/report.html: the summary table (sortable), per-case panels, metrics with CIs, settings."""
        from medcfx.report import write_report_html

        typer.echo(str(write_report_html(out)))

    @app.command(context_settings=EXTRA, epilog="The method's sampling options (--steps, --guidance, "
                 "--max-slices, ...; `medcfx methods NAME` lists them) are given as for evaluate; the thresholds "
                 "hold for the maps of those settings.")
    def calibrate(
        ctx: typer.Context,
        model: str = typer.Argument(..., help="Model reference (name, name:version or sha256:prefix)."),
        data: Path = typer.Option(..., "--data", help="Validation set (annotated, or healthy with --healthy)."),
        fpr: float = typer.Option(0.05, "--fpr", help=FPR_HELP),
        healthy: bool = typer.Option(False, "--healthy", help=HEALTHY_HELP),
        config_file: Optional[Path] = typer.Option(None, "--config", "-c"),
        sets: list[str] = typer.Option([], "--set"),
        device: str = typer.Option("auto", "--device"),
        backend: str = typer.Option("torch", "--backend", help="Denoiser backend: torch or onnx."),
        bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast for the torch backend."),
    ) -> None:
        """Calibrate a model's thresholds on validation data; stored as a new version of the model."""
        from medcfx.cli import _backend, _check_inputs, _inference_request, _run

        check_calibration_options(fpr)
        _check_inputs([data])
        m, request = _inference_request("calibrate", ctx, None, model, config_file, sets, device, None, None,
                                         data=data, extra={"backend": _backend(backend), "bf16": bf16, "fpr": fpr,
                                                           "healthy": healthy})
        _run(m, "calibrate", request)
