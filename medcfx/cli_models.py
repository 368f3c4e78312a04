"""``medcfx models ...``: list, show, verify, remove, import and export (pack) registered models.

``models export REF OUT.tar`` (alias ``models pack``) packs a model into an archive to copy it to another
machine; it is not ``medcfx export REF --format onnx``, which converts a model's denoiser to ONNX and
attaches the .onnx file to the model in the registry.

Mounted by the root CLI with ``app.add_typer(models_app, name="models")``. Commands raise MedcfxError
subclasses for the root to print as one line; ``verify`` exits 3 after listing every problem.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from medcfx import strict_json
from medcfx.errors import MedcfxError
from medcfx.registry import Entry, Registry, default_home, human_bytes

models_app = typer.Typer(
    help="Manage the model store ($MEDCFX_HOME, default ~/.medcfx): list, show, verify, rm, import, and export "
         "(pack a model into a .tar archive; not the ONNX conversion of `medcfx export`).",
    no_args_is_help=True,
)

VERIFY_FAILED_EXIT = 3


def get_registry() -> Registry:
    """The Registry at $MEDCFX_HOME (default ~/.medcfx) with the bundled catalogue.

    The store folder may not exist yet (it is created on the first write), but if it exists it must be
    a writable folder; the error names MEDCFX_HOME."""
    home = default_home()
    origin = "MEDCFX_HOME" if os.environ.get("MEDCFX_HOME", "").strip() else "the default MEDCFX_HOME"
    if home.exists():
        if not home.is_dir():
            raise MedcfxError(f"{origin}={home} is not a folder; point MEDCFX_HOME at a writable folder")
        if not os.access(home, os.W_OK | os.X_OK):
            raise MedcfxError(f"{origin}={home} is not writable; point MEDCFX_HOME at a writable folder")
    return Registry(home)


def _key_metric(entry: Entry) -> tuple[str, Any] | None:
    if not entry.metrics:
        return None
    name = next(iter(entry.metrics))
    return name, entry.metrics[name]


def _summary(entry: Entry) -> dict[str, Any]:
    """The row ``list --json`` prints for one entry."""
    metric = _key_metric(entry)
    return {
        "ref": entry.ref,
        "name": entry.name,
        "version": entry.version,
        "method": entry.method,
        "digest": entry.digest,
        "bytes": entry.size,
        "size": human_bytes(entry.size),
        "created": entry.created,
        "key_metric": None if metric is None else {"name": metric[0], "value": metric[1]},
        "tags": list(entry.tags),
        "parent": entry.parent,
        "bundled": entry.bundled,
    }


def _fmt_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@models_app.command("list")
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List registered and bundled models."""
    entries = get_registry().entries()
    if as_json:
        typer.echo(strict_json.dumps([_summary(e) for e in entries], indent=2))
        return
    from rich.console import Console

    console = Console()
    if not entries:
        console.print(f"no models in {default_home()} (train one, or `medcfx models import FILE`)")
        return
    rows = []
    for e in entries:
        metric = _key_metric(e)
        rows.append({"ref": e.ref, "method": e.method, "digest": e.digest[:12], "size": human_bytes(e.size),
                     "created": e.created, "key metric": "" if metric is None else f"{metric[0]}={_fmt_value(metric[1])}",
                     "": "bundled" if e.bundled else ""})
    print_fitted(console, rows)


# columns of `models list`, in order; the reference is never cut: created is shortened to its date, then
# columns are dropped from the last of DROP_ORDER until the table fits the terminal (ref and method stay;
# on a terminal narrower than the longest reference the line is longer than the terminal, the ref whole)
LIST_COLUMNS = ("ref", "method", "digest", "size", "created", "key metric", "")
DROP_ORDER = ("ref", "method", "", "key metric", "size", "created", "digest")


def fitted_columns(rows: list[dict[str, str]], width: int) -> tuple[list[str], list[dict[str, str]]]:
    """The columns of ``rows`` (in :data:`LIST_COLUMNS` order) that fit ``width`` terminal columns with the
    reference whole: created is first shortened to its date, then columns are dropped, last of
    :data:`DROP_ORDER` first, down to ref and method. Returns (columns, rows), rows possibly shortened."""
    def need(cols, rs) -> int:  # box=None, no left padding, one space after every column
        return sum(max(len(c), *(len(r[c]) for r in rs)) + 1 for c in cols)

    cols = list(LIST_COLUMNS)
    if need(cols, rows) > width:
        rows = [{**r, "created": r["created"][:10]} for r in rows]
    for victim in reversed(DROP_ORDER[2:]):  # ref and method stay (a longer line wraps, whole)
        if need(cols, rows) <= width:
            break
        cols.remove(victim)
    return cols, rows


def print_fitted(console, rows: list[dict[str, str]]) -> None:
    """Print ``rows`` as a table that fits ``console.width`` without ever cutting a reference (name:version);
    a reference longer than the terminal is printed whole on its own line."""
    from rich.table import Table

    cols, rows = fitted_columns(rows, console.width)
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0))
    for column in cols:
        table.add_column(column, no_wrap=True, overflow="ignore",
                         min_width=max(len(column), *(len(r[column]) for r in rows)) if column == "ref" else None)
    for r in rows:
        table.add_row(*(r[c] for c in cols))
    console.print(table, crop=False, overflow="ignore")


@models_app.command("show")
def show_cmd(
    ref: Annotated[str, typer.Argument(help="name, name:VERSION or sha256:PREFIX")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Show every field of one model, with the artifacts' locations."""
    registry = get_registry()
    entry = registry.resolve(ref)
    record = {"ref": entry.ref, "digest": entry.digest, "bundled": entry.bundled, **entry.to_dict()}
    for role, rec in record["artifacts"].items():
        rec["file"] = str(registry.artifact_path(entry, role, verify=False))
    if as_json:
        typer.echo(strict_json.dumps(record, indent=2, note=False))
    else:
        typer.echo(yaml.safe_dump(record, sort_keys=False, allow_unicode=True).rstrip())


@models_app.command("verify")
def verify_cmd(
    ref: Annotated[Optional[str], typer.Argument(help="One model; all models if left out.")] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Remove stored objects that no model references.")] = False,
) -> None:
    """Check the sha256 of every artifact and list stored objects no model references; exit 3 if any
    artifact is missing, corrupt, modified or outside its folder."""
    if fix and ref is not None:
        raise MedcfxError("models verify --fix cleans the whole store: leave out the model reference")
    registry = get_registry()
    entries = [registry.resolve(ref)] if ref is not None else registry.entries()
    bad = 0
    for entry in entries:
        problems = registry.verify(entry)
        if problems:
            bad += 1
            for _, problem in problems:
                typer.echo(f"FAIL {entry.ref}: {problem}")
        else:
            typer.echo(f"OK   {entry.ref} ({len(entry.artifacts)} artifact(s))")
    if ref is None:
        orphans = registry.remove_unreferenced() if fix else registry.unreferenced_objects()
        for path in orphans:
            typer.echo(f"REMOVED {path}" if fix else f"UNREFERENCED {path} ({human_bytes(path.stat().st_size)})")
        if orphans and not fix:
            typer.echo(f"{len(orphans)} stored object(s) belong to no model; `medcfx models verify --fix` removes them")
    if bad:
        typer.echo(f"{bad} of {len(entries)} model(s) failed verification", err=True)
        raise typer.Exit(VERIFY_FAILED_EXIT)


def _interactive() -> bool:
    return sys.stdin.isatty()


@models_app.command("rm")
def rm_cmd(
    ref: Annotated[str, typer.Argument(help="name (latest version), name:VERSION or sha256:PREFIX")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove one model version (and the stored files no other version uses)."""
    registry = get_registry()
    entry = registry.resolve(ref)
    if entry.bundled:
        registry.remove(entry.ref)  # raises the "bundled, cannot be removed" error
    if not yes:
        if not _interactive():
            raise MedcfxError(f"models rm {ref}: refusing to remove {entry.ref} without confirmation; "
                              f"pass --yes (stdin is not a terminal)")
        if not typer.confirm(f"remove {entry.ref} ({entry.method}, {entry.digest[:12]})?", default=False):
            typer.echo("nothing removed")
            raise typer.Exit(1)
    removed = registry.remove(entry.ref)
    typer.echo(f"removed {removed.ref}")


@models_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="A .tar / .tar.gz written by `medcfx models export`.")],
) -> None:
    """Import an exported model (verified before anything is registered)."""
    entry = get_registry().import_(file)
    source = entry.provenance.get("imported_from", {}).get("ref", "?")
    typer.echo(f"imported {entry.ref} (was {source}, digest {entry.digest[:12]})")


def export_cmd(
    ref: Annotated[str, typer.Argument(help="name, name:VERSION or sha256:PREFIX")],
    out: Annotated[Path, typer.Argument(help="Output archive: .tar, .tar.gz or .tgz")],
) -> None:
    """Pack one model (entry.yaml + verified artifacts) into a .tar archive, to copy it to another machine
    (`medcfx models import` reads it). Not the ONNX conversion: that is `medcfx export REF --format onnx`."""
    registry = get_registry()
    entry = registry.resolve(ref)
    path = registry.export(entry, out)
    typer.echo(f"packed {entry.ref} into {path}")


models_app.command("export")(export_cmd)
models_app.command("pack", help="Same as `models export`: pack one model into a .tar archive (entry.yaml + "
                                "verified artifacts) for `medcfx models import` on another machine.")(export_cmd)
