"""Information commands of the root CLI: ``env``, ``methods`` and ``plugins``.

Registered on the root app by :func:`add_info_commands` (``medcfx.cli``). Nothing here imports torch except
``env`` (it reports torch's version), so ``medcfx methods`` answers at once.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import medcfx
from medcfx import config_keys
from medcfx.plugins import get_plugins


def method_record(m) -> dict:
    """``medcfx methods --json`` for one method: its description plus ``presets`` (each as the dotted keys
    it changes) and ``settings`` (every key ``--set`` accepts, with its default and meaning)."""
    return {**m.describe(), "presets": config_keys.presets(m.defaults), "settings": config_keys.settings(m.defaults)}


def add_info_commands(app: typer.Typer, console: Console) -> None:
    """Add ``env``, ``methods`` and ``plugins`` to ``app``, printing on ``console``."""

    @app.command()
    def env() -> None:
        """Print versions and settings for bug reports."""
        import importlib.metadata as md

        import torch

        def ver(dist: str) -> str:
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                return "not installed"

        rows = {
            "medcfx": medcfx.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch threads": str(torch.get_num_threads()),
            "cuda available": str(torch.cuda.is_available()),
            "bf16 (cpu)": str(getattr(torch.backends, "mkldnn", None) is not None and torch.backends.mkldnn.is_available()),
        }
        for dist in ("numpy", "typer", "pluggy", "rich", "safetensors", "nibabel", "scikit-learn", "pillow", "pyyaml",
                     "onnx", "onnxruntime", "onnxruntime-gpu", "pydicom", "nilearn"):
            rows[dist] = ver(dist)
        try:
            import onnxruntime

            rows["onnxruntime providers"] = ", ".join(onnxruntime.get_available_providers())
        except ImportError:
            pass
        rows["MEDCFX_HOME"] = os.environ.get("MEDCFX_HOME", "~/.medcfx (default)")
        rows["plugins"] = ", ".join(f"{p.name} ({p.status})" for p in get_plugins().info) or "none"
        from medcfx.registry import git_commit

        rows["git commit"] = git_commit() or "unknown"
        table = Table(show_header=False)
        for k, v in rows.items():
            table.add_row(k, v)
        console.print(table)

    @app.command()
    def methods(
        name: Optional[str] = typer.Argument(None, help="Show one method with its presets, settings and options."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:
        """List the installed methods: what each can do and its backends; with NAME also its presets, every
        setting `--set` accepts (default and meaning) and its own command options."""
        plugins = get_plugins()
        items = [plugins.method(name)] if name else list(plugins.methods().values())
        if as_json:
            console.print_json(json.dumps([method_record(m) for m in items], default=str))
            return
        cols = ("method", "plugin", "can", "backends", "channels", "conditioning", "targets", "summary")
        rows = [(m.name, m.plugin, ", ".join(sorted(m.capabilities)), ", ".join(m.backends),
                 ",".join(map(str, m.input_channels)) or "any", ", ".join(m.conditioning) or "-",
                 ", ".join(m.targets) or "-", m.summary) for m in items]
        if name:  # one method: a field per line, readable at any width
            table = Table(show_header=False, box=None, pad_edge=False)
            table.add_column(style="bold", no_wrap=True)
            table.add_column(overflow="fold")
            for col, value in zip(cols, rows[0]):
                table.add_row(col, escape(value))
            console.print(table)
            _print_method_details(console, items[0])
            return
        table = Table(title="medcfx methods")
        for col in cols:
            table.add_column(col)
        for row in rows:
            table.add_row(*(escape(v) for v in row))
        console.print(table)

    @app.command()
    def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """List the loaded plugins (built-in and entry points) and their hooks."""
        p = get_plugins()
        p.methods()
        by_plugin: dict[str, list[str]] = {}
        for m in p.methods().values():
            by_plugin.setdefault(m.plugin, []).append(m.name)
        rows = [
            {"name": i.name, "source": i.source, "module": i.module, "status": i.status,
             "hooks": list(i.hooks), "methods": by_plugin.get(i.name, [])}
            for i in p.info
        ]
        if as_json:
            console.print_json(json.dumps(rows))
            return
        table = Table(title="medcfx plugins")
        for col in ("plugin", "source", "status", "hooks", "methods"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], r["source"], r["status"], ", ".join(r["hooks"]), ", ".join(r["methods"]))
        console.print(table)


def _print_method_details(console: Console, m) -> None:
    """Presets, settings (``--set``) and command options of one method."""
    out = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    presets = config_keys.presets(m.defaults)
    if presets:
        out("\n[bold]presets[/bold] (train --preset NAME; without --preset: the defaults below):")
        for pname, changes in presets.items():
            out(f"  {pname}: {escape(config_keys.preset_summary(changes))}")
    keys = config_keys.settings(m.defaults)
    if keys:
        out("\n[bold]settings[/bold] (--set KEY=VALUE or a -c YAML file; `--print-config` shows them resolved):")
        table = Table(box=None, header_style="bold", pad_edge=False)
        table.add_column("key", no_wrap=True)
        for col in ("default", "meaning"):
            table.add_column(col, overflow="fold")
        for row in keys:
            table.add_row(row["key"], escape(config_keys.format_value(row["default"])), row["meaning"])
        console.print(table)
    for command, opts in m.options.items():
        out(f"\n[bold]{command}[/bold] options:")
        for o in opts:
            out(f"  {o.flag} ({o.type.__name__}, default {o.default!r}): {escape(o.help)}")
