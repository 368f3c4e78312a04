"""``medcfx data ...``: check a dataset, prepare (preprocess into the cache), write demo data.

Thin: parse, call :mod:`medcfx.data`, print with rich. Every user error is a MedcfxError (the root CLI
prints it as one line).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medcfx.errors import MedcfxError, UsageError
from medcfx.validate import check_output_folder

console = Console()
err_console = Console(stderr=True)

data_app = typer.Typer(
    help="Datasets: check a layout for problems, prepare (preprocess into the cache), write demo data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

KIND_HELP = "Layout kind (brats, folder, csv, nnunet, npz); detected when omitted."


@data_app.command("check")
def check_cmd(
    path: Path = typer.Argument(..., help="Dataset folder, labels.csv or .npz."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    kind: Optional[str] = typer.Option(None, "--kind", help=KIND_HELP),
    modalities: Optional[str] = typer.Option(None, "--modalities", help="MRI channels, comma-separated (default t1,t1ce,t2,flair)."),
) -> None:
    """Scan a dataset and list EVERY problem (exit 1 when there is any)."""
    from medcfx.data.check import check

    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    report = check(path, kind=kind, modalities=modalities)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))  # plain: never wrapped by the terminal width
    else:
        _print_report(report)
    if not report.ok:
        # a MedcfxError (not typer.Exit) so the exit status is 1 however the app is mounted
        raise MedcfxError(f"{path}: {len(report.problems)} problem(s) found")


def _print_report(report) -> None:
    t = Table(title=f"{report.path}", show_header=False, title_justify="left")
    t.add_row("layout", str(report.kind))
    t.add_row("cases", str(report.cases))
    t.add_row("files", str(report.files))
    t.add_row("channels", ", ".join(report.channels) or "-")
    if report.shapes:
        t.add_row("shapes", "; ".join(f"{k} ({v})" for k, v in report.shapes.items()))
    if report.spacings:
        t.add_row("spacing", "; ".join(f"{k} mm ({v})" for k, v in report.spacings.items()))
    for name, counts in report.label_counts.items():
        t.add_row(f"label {name}", ", ".join(f"{k} {v}" for k, v in counts.items()))
    if report.splits:
        t.add_row("splits", ", ".join(f"{k} {v}" for k, v in report.splits.items()))
    console.print(t)
    for line in report.info:
        console.print(f"[cyan]info[/cyan] {line}", highlight=False, soft_wrap=True)
    for line in report.problems:
        console.print(f"[red]problem[/red] {line}", highlight=False, soft_wrap=True)
    if report.ok:
        console.print("[green]no problems found[/green]")
    else:
        console.print(f"[red]{len(report.problems)} problem(s)[/red]")


def load_preprocess_yaml(path: Path) -> dict:
    """Preprocess keys from a YAML file: top level, or under a ``preprocess:`` / ``data:`` section."""
    from medcfx.config import load_yaml

    data = load_yaml(path)
    for section in ("preprocess", "data"):
        if isinstance(data.get(section), dict):
            return dict(data[section])
    return data


@data_app.command("prepare")
def prepare_cmd(
    path: Path = typer.Argument(..., help="Dataset folder, labels.csv or .npz."),
    size: Optional[int] = typer.Option(None, "--size", help="Output side in pixels (default 64)."),
    modalities: Optional[str] = typer.Option(None, "--modalities", help="MRI channels, comma-separated (default t1,t1ce,t2,flair)."),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with preprocess keys."),
    kind: Optional[str] = typer.Option(None, "--kind", help=KIND_HELP),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder (default $MEDCFX_CACHE, $MEDCFX_HOME/cache, ~/.medcfx/cache)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Preprocess a dataset into the cache (a second run with the same files and config is instant)."""
    from medcfx.data.preprocess import PreprocessConfig, prepare

    if cache is not None:
        check_output_folder(cache.expanduser(), "--cache")
    values = load_preprocess_yaml(config_file) if config_file else {}
    if size is not None:
        values["size"] = size
    if modalities is not None:
        values["modalities"] = modalities
    cfg = PreprocessConfig.from_dict(values)
    ss = prepare(path, cfg, cache_dir=cache, progress=not as_json, kind=kind)
    summary = {
        "cache": str(ss.path),
        "fingerprint": ss.fingerprint,
        "kind": ss.kind,
        "cases": len(ss.cases),
        "slices": len(ss),
        "channels": ss.channels,
        "size": ss.size,
        "labels": ss.label_counts(),
        "masks": ss.masks is not None,
        "notes": ss.notes,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    t = Table(title=f"prepared {path}", show_header=False, title_justify="left")
    t.add_row("layout", ss.kind)
    t.add_row("cases", str(summary["cases"]))
    t.add_row("slices", f"{len(ss)} x {len(ss.channels)} x {ss.size} x {ss.size}")
    t.add_row("channels", ", ".join(ss.channels))
    for name, counts in summary["labels"].items():
        t.add_row(f"label {name}", ", ".join(f"{k} {v}" for k, v in counts.items()))
    t.add_row("masks", "yes" if summary["masks"] else "no")
    notes = sorted(ss.notes.items(), key=lambda kv: -kv[1])
    for note, k in notes[:10]:
        t.add_row(f"note ({k} case(s))", escape(note))
    if len(notes) > 10:
        t.add_row("notes", f"... and {len(notes) - 10} more (see --json)")
    console.print(t)
    console.print(f"cache folder: {summary['cache']}", highlight=False, soft_wrap=True)


@data_app.command("demo")
def demo_cmd(
    kind: str = typer.Argument(..., help="brain, vertebra or chest."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created)."),
    cases: Optional[int] = typer.Option(None, "--cases", help="Number of cases (default per kind)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    opt: list[str] = typer.Option([], "--opt", help="Kind-specific option KEY=VALUE, e.g. shape=[120,120,78] (repeatable)."),
) -> None:
    """Write a small synthetic dataset in a real layout (offline demo data)."""
    try:
        from medcfx.demo import DEMO_KINDS, make_demo
    except ImportError as exc:
        raise MedcfxError(f"demo data is not available in this installation: {exc}") from None
    if kind not in DEMO_KINDS:
        raise UsageError(f"unknown demo kind {kind!r}; choose one of: {', '.join(DEMO_KINDS)}")
    from medcfx.config import parse_set
    from medcfx.demo import demo_options

    opts = parse_set(opt)
    known = demo_options(kind)
    for key in opts:
        if key not in known:
            raise UsageError(f"unknown --opt {key} for {kind} (known: {', '.join(sorted(known))})")
    if overwrite:
        opts["overwrite"] = True
    check_output_folder(out, "--out")
    n = cases if cases is not None else DEMO_DEFAULT_CASES.get(kind)
    step = _progress_step(n)
    console.print(f"writing {n if n is not None else 'the default number of'} {kind} demo cases to {out} "
                  f"({'a line per case' if step == 1 else f'a line every {step} cases'})", highlight=False, markup=False)
    t0 = time.perf_counter()
    with _progress(out, n, t0):
        written = make_demo(kind, out, cases=cases, seed=seed, **opts)
    console.print(f"wrote {n if n is not None else ''} {kind} demo cases to {written} in "
                  f"{time.perf_counter() - t0:.1f} s", highlight=False, markup=False)


# the makers' default case counts (medcfx.demo.make_demo), for the progress lines only
DEMO_DEFAULT_CASES = {"brain": 20, "vertebra": 400, "chest": 400}


def _progress_step(n: Optional[int]) -> int:
    return 1 if n is None or n <= 20 else max(1, n // 10)


def _cases_written(out: Path) -> int:
    """Cases in this process's staging folder of ``out`` (medcfx.staging names it
    ``.medcfx-tmp-<pid>-...-<out name>``): files under images/ (vertebra, chest), else case folders (brain;
    the last folder is the case being written and is not counted)."""
    from medcfx import staging

    parent, mine = out.absolute().parent, f"{staging.PREFIX}{os.getpid()}-"
    try:
        tmps = [p for p in parent.iterdir() if p.name.startswith(mine) and p.name.endswith("-" + out.name)]
    except OSError:
        return 0
    total = 0
    for tmp in tmps:
        images = tmp / "images"
        try:
            if images.is_dir():
                total += sum(1 for p in images.iterdir() if not p.name.startswith("."))
            else:
                total += max(0, sum(1 for p in tmp.iterdir() if p.is_dir() and not p.name.startswith(".")) - 1)
        except OSError:
            pass
    return total


@contextlib.contextmanager
def _progress(out: Path, n: Optional[int], t0: float):
    """While the block runs, a thread prints ``k/n cases (elapsed)`` every :func:`_progress_step` cases,
    counted in the output's staging folder (the demo writers offer no callback)."""
    stop = threading.Event()
    step = _progress_step(n)

    def watch() -> None:
        shown = 0
        while not stop.wait(0.5):
            done = _cases_written(out)
            if done >= shown + step and (n is None or done < n):
                shown = done - done % step
                of = f"/{n}" if n is not None else ""
                console.print(f"  {done}{of} cases ({time.perf_counter() - t0:.0f} s)", highlight=False, markup=False)

    thread = threading.Thread(target=watch, name="demo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@data_app.command("synth-anomalies")
def synth_anomalies_cmd(
    path: Path = typer.Argument(..., help="Dataset folder (healthy slices are used when labels say which)."),
    out: Path = typer.Option(Path("anomalies.png"), "--out", "-o", help="PNG file to write."),
    size: int = typer.Option(64, "--size", help="Slice size in pixels."),
    modalities: Optional[str] = typer.Option(None, "--modalities", help="MRI channels, comma-separated (default t1,t1ce,t2,flair)."),
    rows: int = typer.Option(3, "--rows", help="Number of example images (>= 2)."),
    channel: int = typer.Option(0, "--channel", help="Channel shown."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """Write an example grid of the five synthetic anomaly tasks (medcfx.anomalies) as a PNG."""
    import numpy as np

    from medcfx.anomalies import example_grid
    from medcfx.data.preprocess import PreprocessConfig, prepare

    if rows < 2:
        raise UsageError(f"--rows must be >= 2, got {rows}")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the grid is written as PNG; give a .png file name")
    if out.is_dir():
        raise UsageError(f"--out {out}: a folder exists there; give a .png file name")
    check_output_folder(out.parent, "--out")
    values = {"size": size}
    if modalities is not None:
        values["modalities"] = modalities
    ss = prepare(path, PreprocessConfig.from_dict(values), progress=False)
    if not 0 <= channel < len(ss.channels):
        raise UsageError(f"--channel {channel}: the data has channels 0..{len(ss.channels) - 1} ({', '.join(ss.channels)})")
    labels = ss.labels[:, 0] if ss.labels.shape[1] else np.full(len(ss), np.nan)
    rows_ok = np.flatnonzero(labels == 0) if (labels == 0).any() else np.arange(len(ss))
    if len(rows_ok) < 2:
        raise MedcfxError(f"{path}: needs at least two (healthy) slices, found {len(rows_ok)}")
    # the slices with the most foreground (of at most 500 spread over the dataset)
    rows_ok = rows_ok[np.linspace(0, len(rows_ok) - 1, min(len(rows_ok), 500)).round().astype(int)]
    area = np.array([(np.asarray(ss.images[r]) > -1).any(0).mean() for r in rows_ok])
    big = rows_ok[area >= np.quantile(area, 0.5)]
    pick = big[np.linspace(0, len(big) - 1, rows).round().astype(int)]
    written = example_grid([np.asarray(ss.images[r]) for r in pick], out, seed=seed, channel=channel)
    console.print(f"wrote {written} ({rows} images x 5 tasks)", highlight=False)
