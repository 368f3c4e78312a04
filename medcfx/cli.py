"""The ``medcfx`` command line (Typer). Thin: parse, check the request, call the method, print.

Errors reach the user as one line on stderr and a non-zero exit (1 user error, 2 usage, 3 integrity);
``--debug`` (or MEDCFX_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.console import Console

import medcfx
from medcfx import config as cfgmod
from medcfx import staging, strict_json
from medcfx.cli_info import add_info_commands
from medcfx.errors import CaseErrors, MedcfxError, UsageError
from medcfx.method import Method, Request
from medcfx.plugins import get_plugins
from medcfx.validate import check_fixed_by_model, check_output_folder, check_train_request

console = Console()
err_console = Console(stderr=True)

PRINT_CONFIG_HELP = "Print the fully resolved config (YAML) and exit without doing any work."
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
METHOD_OPTIONS_HELP = "Method-specific options follow the method's own flags; `medcfx methods NAME` lists them."

app = typer.Typer(
    name="medcfx",
    help="Diffusion counterfactuals for medical images: where is the disease, how severe, and why.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"medcfx {medcfx.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    """medcfx: train, explain, grade and evaluate diffusion counterfactual methods from plugins."""


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the method commands


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    elif device != "cpu":
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def _registry():
    from medcfx.cli_models import get_registry

    return get_registry()


def _user_layers(config_file: Optional[Path], sets: list[str]) -> list[dict]:
    """The config layers the user gave: ``-c`` file, then ``--set`` values."""
    return ([cfgmod.load_yaml(config_file)] if config_file else []) + [cfgmod.parse_set(sets)]


def _merged(layers: list[dict]) -> dict:
    """The user's layers merged (already checked against the method's keys by _resolve_config)."""
    out: dict = {}
    for layer in layers:
        out = cfgmod.deep_merge(out, layer or {})
    return out


def _resolve_config(method: Method, command: str, layers: list[dict], preset: Optional[str] = None) -> dict:
    defaults = dict(method.defaults)
    presets = defaults.pop("presets", {})
    if preset:
        if preset not in presets:
            raise UsageError(f"unknown preset '{preset}' for method '{method.name}' (known: {', '.join(presets) or 'none'})")
        layers = [presets[preset], *layers]
    return cfgmod.resolve(defaults, *layers)


def _method_for(command: str, method: Optional[str], model: Optional[str]) -> tuple[Method, object]:
    """Pick the method: --method, else the method recorded in the --model registry entry."""
    plugins = get_plugins()
    registry = None
    if method is None:
        if model is None:
            capable = [m.name for m in plugins.methods().values() if command in m.capabilities]
            if len(capable) == 1:
                method = capable[0]
            else:
                raise UsageError(f"'{command}' needs --method (one of: {', '.join(capable) or 'none installed'}) or --model")
        else:
            registry = _registry()
            method = registry.resolve(model).method
    m = plugins.method(method)
    m.require(command)
    return m, registry


def default_model(m: Method, registry, model: Optional[str]) -> Optional[str]:
    """``--model`` as given, else (for a method that trains models) the newest registered model of the
    method, a user-trained one before a bundled one, said in one line on stderr (``using sanchez-brats:3``);
    None when the method needs no model or has none registered (its handler then says what it needs)."""
    if model is not None or "train" not in m.capabilities:
        return model
    entry = registry.newest(m.name)
    if entry is None:
        return None
    err_console.print(f"using {entry.ref}", highlight=False, markup=False)
    return entry.ref


def _run(m: Method, command: str, request: Request, report: bool = False) -> None:
    """Run the method's handler and print its summary; with ``report``, also write OUT/report.html (also when
    some cases failed: they are rows of its table)."""
    try:
        result = m.handler(command)(request)
    except CaseErrors as exc:  # some cases failed: what was written is summarised, then one line per failure
        if not isinstance(exc.summary, dict) or exc.summary.get("cases") or exc.summary.get("skipped"):
            _print_summary(exc.summary)  # (nothing written: no summary, only the errors)
        if report and request.out is not None and Path(request.out).is_dir():
            from medcfx.report import write_report_html

            write_report_html(request.out)
        raise
    _print_summary(result)
    if report:
        from medcfx.report import write_report_html

        write_report_html(request.out)


def _print_summary(result) -> None:
    if isinstance(result, dict) and result.get("printed") is not True:
        summary = {k: v for k, v in result.items() if k != "printed"}
        if summary:  # strict JSON: a value that could not be computed (NaN) is null, with a note
            console.print_json(strict_json.dumps(summary, default=str))


# ----------------------------------------------------------------------------------------------------------
# information commands (medcfx.cli_info)

add_info_commands(app, console)


# ----------------------------------------------------------------------------------------------------------
# method commands


@app.command(context_settings=EXTRA, epilog=METHOD_OPTIONS_HELP)
def train(
    ctx: typer.Context,
    method: str = typer.Argument(..., help="Method to train (see `medcfx methods`)."),
    data: Path = typer.Option(..., "--data", help="Dataset folder or file."),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config merged over the defaults."),
    sets: list[str] = typer.Option([], "--set", help="Override one config value: a.b=c (repeatable)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Named configuration preset of the method."),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name of the trained model."),
    resume: bool = typer.Option(False, "--resume", help="Continue the latest run of this method on this data."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run folders are created."),
    print_config: bool = typer.Option(False, "--print-config", help=PRINT_CONFIG_HELP),
    logger: Optional[str] = typer.Option(None, "--logger", help="Also log to tensorboard (RUN/tensorboard) or mlflow "
                                                                "(RUN/mlruns); optional extras."),
) -> None:
    """Train a method's model; the result is registered in the model registry. Without --preset the method's
    defaults are used (`medcfx methods METHOD` lists the presets and every setting)."""
    m = get_plugins().method(method)
    m.require("train")
    options = m.parse_options("train", ctx.args)
    if not data.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    config = _resolve_config(m, "train", _user_layers(config_file, sets), preset)
    if print_config:
        _print_config(m, "train", config, preset=preset)
    check_train_request(config, name, runs_dir)  # before any data is read or any folder created
    from medcfx.train_loggers import check_logger

    check_logger(logger)
    _say_preset(m, preset)
    request = Request(command="train", method=m, options=options, config=config, data=data, name=name,
                      resume=resume, device=resolve_device(device), seed=m.check_seed("train", seed), runs_dir=runs_dir,
                      registry=_registry(), console=console, extra={"preset": preset, "logger": logger})
    _run(m, "train", request)


def _print_config(m: Method, command: str, config: dict, preset: Optional[str] = None,
                  model: Optional[str] = None) -> None:
    """``--print-config``: the resolved config as YAML on stdout, then exit 0 (nothing read, nothing written)."""
    import yaml

    from medcfx.config_keys import _plain

    source = f"--preset {preset}" if preset else "the method's defaults"
    typer.echo(f"# medcfx {command}: resolved config of method {m.name} ({source} <- -c FILE <- --set)")
    if model:
        typer.echo(f"# --model {model}: the settings the model fixes (preprocess, its sampling defaults) "
                   f"are in `medcfx models show {model}`")
    note = m.config_note(config) if m.config_note is not None and command != "train" else ""
    if note:
        typer.echo(f"# {note}")
    typer.echo(yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True).rstrip())
    raise typer.Exit(0)


def _say_preset(m: Method, preset: Optional[str]) -> None:
    """One line when training without --preset on a method that has presets (the defaults can be a
    paper-sized run)."""
    presets = m.defaults.get("presets") or {}
    if preset is None and presets:
        same = [name for name, over in presets.items() if not over]
        like = f" (= --preset {same[0]})" if same else ""
        err_console.print(f"no --preset: training with {m.name}'s defaults{like}; presets: {', '.join(presets)} "
                          f"(`medcfx methods {m.name}` shows what each sets)", highlight=False, markup=False)


def default_out(base: Path, m: Method, registry, model: Optional[str]) -> Path:
    """The default output folder of a command: ``base/<method>-<model name>-v<version>``, or
    ``base/<method>`` without --model, so that two methods or two models never write into one folder."""
    def safe(name: str) -> str:  # model and method names are already plain; a plugin's might not be
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip(".") or "out"

    if model is None:
        return base / safe(m.name)
    entry = registry.resolve(model)
    return base / safe(f"{m.name}-{entry.name}-v{entry.version}")


def _inference_request(command: str, ctx: typer.Context, method: Optional[str], model: Optional[str],
                       config_file, sets, device: str, seed: Optional[int], out: Optional[Path], inputs=None,
                       out_base: Optional[Path] = None, print_config: bool = False,
                       **kw) -> tuple[Method, Request]:
    """Check everything about an explain / grade / evaluate / predict / sample request that can be checked
    before work starts (options, inputs, config, --out, --seed, overrides a model fixes), sweep ``--out``
    of temporaries left by killed runs, and build the Request. Without --out the output goes to
    :func:`default_out` under ``out_base``; ``print_config`` prints the resolved config and exits."""
    m, registry = _method_for(command, method, model)
    seed = m.check_seed(command, seed)
    if inputs is None:
        options = m.parse_options(command, ctx.args)
    else:  # options given after the input paths arrive mixed with them: separate the two
        paths: list[str] = []
        options = m.parse_options(command, [str(p) for p in inputs] + ctx.args, positionals=paths)
        if not paths and not print_config:
            raise UsageError(f"'{command}' needs at least one input file or folder")
        inputs = [Path(p) for p in paths]
        _check_inputs(inputs)
        kw["inputs"] = inputs
    extra = kw.get("extra") or {}
    m.require_backend(extra.get("backend", "torch"), bool(extra.get("bf16")))
    layers = _user_layers(config_file, sets)
    config = _resolve_config(m, command, layers)
    registry = registry or _registry()
    if not print_config:
        model = default_model(m, registry, model)
    if "train" in m.capabilities:  # a trained model's preprocessing is replayed; an override would do nothing
        check_fixed_by_model(layers, registry, model)
    if print_config:
        _print_config(m, command, config, model=model)
    if out is None and out_base is not None:
        out = default_out(out_base, m, registry, model)
        err_console.print(f"--out not given: writing to {out}", highlight=False, markup=False)
    if out is not None:
        check_output_folder(out, "--out", inputs=kw.get("inputs") or [kw.get("data")])
    device = resolve_device(device)
    if out is not None:
        staging.sweep(out)  # temporaries of killed runs (dead processes only)
        if command == "sample":
            staging.sweep(out.absolute().parent)  # sample stages the whole --out folder beside it
    request = Request(command=command, method=m, options=options, config=config, model=model, out=out,
                      device=device, seed=seed, registry=registry, console=console,
                      user_config=_merged(layers), **kw)
    return m, request


def _backend(name: str) -> str:
    if name not in ("torch", "onnx"):
        raise UsageError(f"--backend must be torch or onnx, got {name!r}")
    return name


def _check_inputs(paths: list[Path]) -> None:
    for p in paths:
        if not p.exists():
            raise UsageError(f"input {p}: no such file or folder")


def _input_command(name: str, summary: str, inputs_help: str, out_base: Optional[Path]) -> None:
    """explain / grade / predict: INPUT... plus the common inference options, dispatched to the method.
    Without --out, output goes to ``out_base/<method>-<model name>-v<version>`` (:func:`default_out`)."""
    out_help = "Output folder." if out_base is None else \
        f"Output folder (default: {out_base}/<method>-<model name>-v<version>, {out_base}/<method> without --model)."

    def command(
        ctx: typer.Context,
        inputs: list[Path] = typer.Argument(..., help=inputs_help),
        method: Optional[str] = typer.Option(None, "--method", "-m", help="Method (default: the --model's method)."),
        model: Optional[str] = typer.Option(None, "--model", help="Registry reference: name, name:VERSION or sha256:PREFIX."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help=out_help),
        config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config merged over the defaults."),
        sets: list[str] = typer.Option([], "--set", help="Override one config value: a.b=c (repeatable)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0; refused where the "
                                                                 "method's result does not depend on it)."),
        backend: str = typer.Option("torch", "--backend", help="Denoiser backend: torch or onnx (after `medcfx export`)."),
        bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast for the torch backend (faster on CPUs with AVX-512 BF16 and on GPUs)."),
        print_config: bool = typer.Option(False, "--print-config", help=PRINT_CONFIG_HELP),
        num_parts: Optional[int] = typer.Option(None, "--num-parts", help="explain: split the cases into N parts "
                                                "(default: torchrun's WORLD_SIZE, else 1)."),
        part_id: Optional[int] = typer.Option(None, "--part-id", help="explain: the part this process explains "
                                              "(0..N-1; default: torchrun's RANK)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="explain: redo cases already complete for this "
                                                                  "model and these settings (default: skip them)."),
        report: bool = typer.Option(False, "--report", help="explain: also write OUT/report.html (`medcfx report`)."),
    ) -> None:
        from medcfx.batch import check_batch_options, rank_device

        extra = {"backend": _backend(backend), "bf16": bf16, "num_parts": num_parts, "part_id": part_id,
                 "overwrite": overwrite}
        m, request = _inference_request(name, ctx, method, model, config_file, sets, rank_device(device), seed,
                                         out, inputs=inputs, extra=extra, out_base=out_base,
                                         print_config=print_config)
        check_batch_options(m.name, name == "explain" and m.batch, {**extra, "report": report})
        _run(m, name, request, report=report)

    command.__doc__ = summary
    app.command(name, context_settings=EXTRA, epilog=METHOD_OPTIONS_HELP)(command)


_input_command("explain", "Explain images with counterfactuals: writes counterfactuals, maps, panels and provenance.",
               "Image(s) (PNG, JPEG, TIFF, .npy, DICOM of any name), NIfTI volume(s), DICOM series folder(s) or "
               "dataset/case folder(s).", Path("medcfx-out"))
_input_command("grade", "Grade severity and show counterfactuals across grades.", "Image(s) to grade.", Path("medcfx-out"))


@app.command(context_settings=EXTRA, epilog=METHOD_OPTIONS_HELP)
def evaluate(
    ctx: typer.Context,
    method: str = typer.Argument(..., help="Method to evaluate."),
    model: Optional[str] = typer.Option(None, "--model"),
    data: Path = typer.Option(..., "--data", help="Annotated test set."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: medcfx-eval/<method>-<model "
                                                                  "name>-v<version>, medcfx-eval/<method> without --model)."),
    print_config: bool = typer.Option(False, "--print-config", help=PRINT_CONFIG_HELP),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c"),
    sets: list[str] = typer.Option([], "--set"),
    device: str = typer.Option("auto", "--device"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    backend: str = typer.Option("torch", "--backend", help="Denoiser backend: torch or onnx (after `medcfx export`)."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast for the torch backend."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation set to calibrate the thresholds on first "
                                                           "(default: the model's stored calibration)."),
    fpr: float = typer.Option(0.05, "--fpr", help="With --val: target false-positive rate on healthy voxels."),
    healthy: bool = typer.Option(False, "--healthy", help="With --val: unannotated validation cases are healthy."),
    n_resamples: int = typer.Option(1000, "--n-resamples", help="Bootstrap resamples of the cases for the 95 % "
                                                                 "intervals (0: none; seed fixed at 0)."),
    report: bool = typer.Option(False, "--report", help="Also write OUT/report.html (`medcfx report`)."),
) -> None:
    """Evaluate a model on an annotated test set (metrics with 95 % CIs as a table, JSON and markdown)."""
    from medcfx.cli_calibrate import check_calibration_options

    check_calibration_options(fpr, n_resamples)
    _check_inputs([data] + ([val] if val is not None else []))
    m, request = _inference_request("evaluate", ctx, method, model, config_file, sets, device, seed, out, data=data,
                                     out_base=Path("medcfx-eval"), print_config=print_config,
                                     extra={"backend": _backend(backend), "bf16": bf16, "val": val, "fpr": fpr,
                                            "healthy": healthy, "n_resamples": n_resamples})
    _run(m, "evaluate", request, report=report)


_input_command("predict", "Predict per-finding probabilities for images.", "Images to classify.", None)


@app.command(context_settings=EXTRA, epilog=METHOD_OPTIONS_HELP)
def sample(
    ctx: typer.Context,
    method: Optional[str] = typer.Option(None, "--method", "-m"),
    model: Optional[str] = typer.Option(None, "--model"),
    n: int = typer.Option(16, "-n", help="Number of images."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: medcfx-samples/<method>-"
                                                                  "<model name>-v<version>, medcfx-samples/<method> without --model)."),
    print_config: bool = typer.Option(False, "--print-config", help=PRINT_CONFIG_HELP),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c"),
    sets: list[str] = typer.Option([], "--set"),
    device: str = typer.Option("auto", "--device"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
) -> None:
    """Generate new images from a model."""
    if n < 1:
        raise UsageError("-n must be >= 1")
    m, request = _inference_request("sample", ctx, method, model, config_file, sets, device, seed, out, extra={"n": n},
                                     out_base=Path("medcfx-samples"), print_config=print_config)
    _run(m, "sample", request)


def _mount_subapps() -> None:
    from medcfx.cli_models import models_app
    from medcfx.data.cli import data_app

    app.add_typer(models_app, name="models", help="The local model registry.")
    app.add_typer(data_app, name="data", help="Datasets: check, prepare (cache), demo data.")


_mount_subapps()


def build_app() -> typer.Typer:
    """The root app with every plugin's commands added (``register_commands`` hook)."""
    from medcfx.cli_calibrate import add_calibrate_command
    from medcfx.cli_speed import add_speed_commands

    if "calibrate" not in {c.name for c in app.registered_commands}:
        add_calibrate_command(app)
        add_speed_commands(app)
    get_plugins().add_commands(app)
    return app


def _asks_version(argv: list[str]) -> bool:
    """``--version`` / ``-V`` among the root options (before the command)."""
    for token in argv:
        if token in ("--version", "-V"):
            return True
        if not token.startswith("-"):
            return False
    return False


def _take_threads(argv: list[str]) -> list[str]:
    """``--threads N`` (any command, anywhere on the line) sets the CPU threads torch uses for this process
    (intra-op; OMP_NUM_THREADS / MKL_NUM_THREADS before torch is imported, torch.set_num_threads after).
    Returns ``argv`` without it; UsageError for a value that is not an integer >= 1."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--threads" or arg.startswith("--threads="):
            raw = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if not raw.isdigit() or int(raw) < 1:
                raise UsageError(f"--threads must be an integer >= 1, got {raw!r}")
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = raw
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(int(raw))
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: Optional[list[str]] = None) -> None:
    """The ``medcfx`` console script: run the CLI on ``argv`` (default ``sys.argv[1:]``) and exit with its
    status; errors are printed as one line (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _asks_version(argv):  # answered before any plugin is loaded: no torch import, instant
        console.print(f"medcfx {medcfx.__version__}", highlight=False)
        sys.exit(0)
    debug = "--debug" in argv or os.environ.get("MEDCFX_DEBUG") == "1"
    try:
        argv = _take_threads(argv)
        rv = build_app()(args=argv, prog_name="medcfx", standalone_mode=False)
        if isinstance(rv, int) and rv:  # typer.Exit(code) returns its code when not in standalone mode
            sys.exit(rv)
    except CaseErrors as exc:
        if debug:
            raise
        for failure in exc.failures:
            err_console.print(f"[red]medcfx: error:[/red] {escape(str(failure))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except MedcfxError as exc:
        if debug:
            raise
        err_console.print(f"[red]medcfx: error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("medcfx: interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except typer.Abort:
        err_console.print("medcfx: aborted")
        sys.exit(1)
    except Exception as exc:
        # Typer's (or Click's) usage errors: one line with the command to get help
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if type(exc).__name__ == "NoArgsIsHelpError":
                console.print(exc.ctx.get_help())
                sys.exit(0)
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            err_console.print(f"[red]medcfx: error:[/red] {exc.format_message()}{where}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        if debug:
            raise
        # a bug: still one line, with the way to get the traceback
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(f"[red]medcfx: internal error:[/red] {type(exc).__name__}: {escape(msg)} (run with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(1)
