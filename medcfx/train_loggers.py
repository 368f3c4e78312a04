"""Training logs for the tools anomalib and MONAI users watch: TensorBoard or MLflow (``train --logger``).

Optional: nothing is needed for the default (``metrics.jsonl`` and ``progress.png`` in the run folder stay
in every case). ``tensorboard`` writes event files to ``RUN/tensorboard`` (``tensorboard --logdir RUN``;
needs the ``tensorboard`` package: ``pip install 'medcfx[tensorboard]'``); ``mlflow`` logs to a local file
store ``RUN/mlruns`` (``mlflow ui --backend-store-uri RUN/mlruns``; needs ``mlflow-skinny`` or ``mlflow``:
``pip install 'medcfx[mlflow]'``), experiment "medcfx", one MLflow run per medcfx run folder, with the run's
config as parameters. MLflow's file store is in maintenance mode upstream; medcfx opts in to it
(``MLFLOW_ALLOW_FILE_STORE``) because it needs no database; point ``MLFLOW_TRACKING_URI`` elsewhere to use a
server or a database instead.

Every row ``fit`` writes to ``metrics.jsonl`` (step, loss, lr, it/s, the method's loss terms, validation)
is logged with the same names and step.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from medcfx.errors import UsageError

LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}

__all__ = ["LOGGERS", "check_logger", "open_logger"]


def check_logger(kind: str | None) -> str | None:
    """``kind`` if it names a logger whose package is installed (None: no logger); UsageError otherwise,
    before any run folder exists."""
    if kind is None:
        return None
    if kind not in LOGGERS:
        raise UsageError(f"--logger must be one of {', '.join(LOGGERS)}, got {kind!r}")
    module, extra = LOGGERS[kind]
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"--logger {kind} needs the {module} package: pip install 'medcfx[{extra}]'")
    return kind


class _TensorBoard:
    def __init__(self, run: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))

    def log(self, step: int, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run: Path, params: dict):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run / "mlruns").absolute().as_uri())
        mlflow.set_experiment("medcfx")
        self.active = mlflow.start_run(run_name=f"{run.parent.parent.name}/{run.parent.name}/{run.name}")
        flat = {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}
        if flat:
            mlflow.log_params(flat)

    def log(self, step: int, row: dict) -> None:
        values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if values:
            self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_logger(run: Path | None):
    """The logger the run was started with (``logger`` in RUN/config.yaml, written by ``start_run``), or
    None: an object with ``log(step, row)`` and ``close()``."""
    if run is None or not (run / "config.yaml").exists():
        return None
    import yaml

    record = yaml.safe_load((run / "config.yaml").read_text()) or {}
    kind = check_logger(record.get("logger"))
    if kind == "tensorboard":
        return _TensorBoard(run)
    if kind == "mlflow":
        return _MLflow(run, _flatten(record.get("config") or {}))
    return None
