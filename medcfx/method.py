"""The contract a method plugin fulfils.

A method is registered through the ``register_methods`` hook as a :class:`Method`: a name, the
capabilities it declares, and three components:

- a **trainer** with ``train(request) -> dict`` (the registry entry it created, as a dict);
- a **sampler** with any of ``explain(request)``, ``sample(request)``, ``grade(request)`` (each returns a
  JSON-able summary of what it wrote);
- a **scorer** with ``evaluate(request) -> dict`` (metrics) and optionally ``predict(request)``.

The CLI checks a command against ``capabilities`` before any work starts, parses the method's own
options (declared as :class:`Option` per command) and hands the method one :class:`Request`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medcfx.errors import UsageError

CAPABILITIES = ("train", "explain", "grade", "sample", "evaluate", "predict", "calibrate")

# which component must provide which capability, and under which attribute name
_PROVIDER = {
    "calibrate": ("scorer", "calibrate"),
    "train": ("trainer", "train"),
    "explain": ("sampler", "explain"),
    "grade": ("sampler", "grade"),
    "sample": ("sampler", "sample"),
    "evaluate": ("scorer", "evaluate"),
    "predict": ("scorer", "predict"),
}


@dataclass(frozen=True)
class Option:
    """A method-specific command-line option, e.g. ``Option("guidance", float, 3.0, "CFG scale w")``.

    ``--guidance 3`` on the command line sets ``request.options["guidance"]``. ``type`` is one of
    ``int, float, str, bool`` (bool options are flags: ``--reconstruct``), or ``list`` for a
    comma-separated list of strings. Float values must be finite. ``bounds`` (int and float options) is
    the allowed interval in the usual notation, e.g. ``"(0, 1]"`` or ``"[1, inf)"``; a value outside it is
    refused when the command line is parsed, naming the flag and the interval.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()
    bounds: str = ""

    def __post_init__(self) -> None:
        if self.bounds:
            if self.type not in (int, float):
                raise ValueError(f"option {self.name!r}: bounds apply to int and float options")
            _interval(self.bounds)  # a malformed interval is the plugin author's error, found at registration

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, raw: str | None) -> Any:
        if self.type is bool:
            if raw is None:
                return True
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise UsageError(f"{self.flag} expects true/false, got {raw!r}")
        if raw is None:
            raise UsageError(f"{self.flag} needs a value")
        try:
            if self.type is list:
                value: Any = [p.strip() for p in raw.split(",") if p.strip()]
            else:
                value = self.type(raw)
        except ValueError:
            raise UsageError(f"{self.flag} expects {self.type.__name__}, got {raw!r}") from None
        if self.type is float and not math.isfinite(value):
            raise UsageError(f"{self.flag} must be a finite number, got {raw!r}")
        if self.choices and value not in self.choices:
            raise UsageError(f"{self.flag} must be one of {', '.join(map(str, self.choices))}, got {raw!r}")
        if self.bounds:
            check_bounds(self.flag, value, self.bounds, raw)
        return value


def check_bounds(flag: str, value: float, bounds: str, raw: str | None = None) -> float:
    """Return ``value`` if it is finite and inside ``bounds`` (e.g. ``"(0, 1]"``, ``"[1, inf)"``), else raise
    UsageError naming ``flag`` (for typer options and lists that do not go through :class:`Option`)."""
    shown = raw if raw is not None else f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {shown}")
    if not _interval(bounds)(value):
        raise UsageError(f"{flag} must be {_say(bounds)}, got {shown}")
    return value


def _say(bounds: str) -> str:
    """``"[1, inf)"`` -> ">= 1", ``"(0, inf)"`` -> "> 0", anything else -> "in (0, 1]"."""
    m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*inf\s*\)\s*", bounds)
    if m is None:
        return f"in {bounds.strip()}"
    return f"{'>=' if m.group(1) == '[' else '>'} {m.group(2)}"


def _interval(text: str) -> Callable[[float], bool]:
    """``"(0, 1]"`` -> a membership test; ``inf`` / ``-inf`` for an open end. ValueError when malformed."""
    m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])\s*", text)
    if m is None:
        raise ValueError(f"malformed interval {text!r} (expected e.g. '(0, 1]' or '[1, inf)')")
    lo, hi = float(m.group(2)), float(m.group(3))
    closed_lo, closed_hi = m.group(1) == "[", m.group(4) == "]"
    return lambda v: (lo <= v if closed_lo else lo < v) and (v <= hi if closed_hi else v < hi)


@dataclass
class Request:
    """Everything a method component needs for one command. Fields a command does not use stay None."""

    command: str
    method: "Method"
    options: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    data: Path | None = None
    inputs: list[Path] = field(default_factory=list)
    out: Path | None = None
    model: str | None = None
    name: str | None = None
    resume: bool = False
    device: str = "cpu"
    seed: int = 0
    runs_dir: Path = Path("runs")
    registry: Any = None
    console: Any = None
    extra: dict = field(default_factory=dict)
    user_config: dict = field(default_factory=dict)  # only the keys the user set (-c file, --set)
    said: set = field(default_factory=set, repr=False)  # the lines note() printed (shared by copies)

    def log(self, message: str) -> None:
        """Print one line to the user (plain text: file names with brackets are not read as markup)."""
        if self.console is not None:
            self.console.print(message, markup=False, highlight=False)

    def note(self, message: str, where: str = "") -> None:
        """:meth:`log` a line once per command and ``where`` (the folder read): several passes over the same
        cases (calibration, the channel sweep of ``--channel auto``) say each reader note once, and the same
        note of a same-named case of another folder (the validation set) is said again."""
        if (where, message) not in self.said:
            self.said.add((where, message))
            self.log(message)


@dataclass
class Method:
    """A registered method. ``capabilities`` is checked against the components at registration."""

    name: str
    summary: str
    capabilities: frozenset | set | tuple = ()
    trainer: Any = None
    sampler: Any = None
    scorer: Any = None
    input_channels: tuple[int, ...] = ()  # empty: any channel count
    conditioning: tuple[str, ...] = ()  # e.g. ("label", "image", "semantic", "classifier")
    targets: tuple[str, ...] = ()  # e.g. ("healthy",) or ("no-cardiomegaly", "cardiomegaly", ...)
    options: dict[str, list[Option]] = field(default_factory=dict)  # per command
    # network paths its samplers honour: "torch" always; "bf16" (--bf16 autocast), "onnx" (--backend onnx)
    backends: tuple[str, ...] = ("torch",)
    defaults: dict = field(default_factory=dict)  # default config (train presets live under "presets")
    # commands whose result does not depend on --seed, with the reason (the CLI refuses --seed for them),
    # e.g. {"explain": "the sanchez counterfactual is deterministic (DDIM encode/decode)"}
    deterministic: dict[str, str] = field(default_factory=dict)
    # explain runs through medcfx.batch.run_explain (shards, resume, summary.csv)
    batch: bool = False
    # config -> a line --print-config adds for inference commands, where keys are not what runs as written
    config_note: Any = None
    plugin: str = ""  # filled in by the plugin manager

    def __post_init__(self) -> None:
        self.capabilities = frozenset(self.capabilities)
        unknown = self.capabilities - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"method {self.name!r} declares unknown capabilities {sorted(unknown)}")
        for cap in self.capabilities:
            component, attr = _PROVIDER[cap]
            if not callable(getattr(getattr(self, component), attr, None)):
                raise ValueError(f"method {self.name!r} declares {cap!r} but its {component} has no {attr}()")
        for command in self.options:
            if command not in CAPABILITIES:
                raise ValueError(f"method {self.name!r} declares options for unknown command {command!r}")
        for command in self.deterministic:
            if command not in self.capabilities:
                raise ValueError(f"method {self.name!r} declares {command!r} deterministic but cannot {command}")

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            can = ", ".join(sorted(self.capabilities)) or "nothing"
            raise UsageError(f"method '{self.name}' cannot {capability} (it can: {can})")

    def require_backend(self, backend: str, bf16: bool) -> None:
        """Refuse --backend / --bf16 that this method's samplers would not honour (before any work)."""
        for path, asked in (("onnx", backend == "onnx"), ("bf16", bf16)):
            if asked and path not in self.backends:
                flag = "--backend onnx" if path == "onnx" else "--bf16"
                raise UsageError(f"method '{self.name}' has no {flag} path (it runs: {', '.join(self.backends)})")

    def check_seed(self, command: str, seed: int | None) -> int:
        """The seed to use for ``command`` (0 when none is given); UsageError when ``seed`` is given for a
        command this method declares deterministic (it would have no effect)."""
        if seed is not None and command in self.deterministic:
            raise UsageError(f"{self.deterministic[command]}; --seed has no effect")
        return 0 if seed is None else int(seed)

    def handler(self, capability: str) -> Callable[[Request], Any]:
        self.require(capability)
        component, attr = _PROVIDER[capability]
        return getattr(getattr(self, component), attr)

    def parse_options(self, command: str, args: list[str], positionals: list | None = None) -> dict:
        """Parse leftover command-line tokens against this method's options for ``command``.

        Tokens that are neither an option nor an option's value are appended to ``positionals`` when a
        list is given (commands taking input paths: Click hands options that follow variadic arguments
        over as arguments), and are an error otherwise.
        """
        declared = {o.flag: o for o in self.options.get(command, [])}
        values = {o.name: o.default for o in declared.values()}
        i = 0
        while i < len(args):
            token = args[i]
            if not token.startswith("--"):
                if positionals is None:
                    raise UsageError(f"unexpected argument {token!r}")
                positionals.append(token)
                i += 1
                continue
            flag, _, inline = token.partition("=")
            opt = declared.get(flag)
            if opt is None:
                known = ", ".join(sorted(declared)) or "none"
                raise UsageError(f"unknown option {flag} for '{command}' with method '{self.name}' (its options: {known})")
            if opt.type is bool:
                raw = inline if "=" in token else None
            elif "=" in token:
                raw = inline
            else:
                i += 1
                if i >= len(args):
                    raise UsageError(f"{flag} needs a value")
                raw = args[i]
            values[opt.name] = opt.convert(raw)
            i += 1
        return values

    def describe(self) -> dict:
        return {
            "name": self.name,
            "plugin": self.plugin,
            "summary": self.summary,
            "capabilities": sorted(self.capabilities),
            "input_channels": list(self.input_channels),
            "conditioning": list(self.conditioning),
            "targets": list(self.targets),
            "backends": list(self.backends),
            "deterministic": dict(self.deterministic),
            "options": {
                cmd: [
                    {"flag": o.flag, "type": o.type.__name__, "default": o.default, "help": o.help}
                    for o in opts
                ]
                for cmd, opts in self.options.items()
            },
        }
