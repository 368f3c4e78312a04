"""Configuration: nested dicts built from defaults, a preset, ``-c FILE.yaml`` and ``--set a.b=c``.

The resolved config is what a run saves next to its checkpoints, so every run can be repeated.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from medcfx.errors import UsageError


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 3e-4 as a float (YAML 1.2 style; YAML 1.1 would make it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def deep_merge(base: dict, override: dict) -> dict:
    """Return a new dict: ``override`` merged into ``base`` recursively (override wins on leaves)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_set(items: Iterable[str]) -> dict:
    """Turn ``["a.b=3", "c=[1,2]"]`` into ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UsageError(f"--set has an empty key part in {item!r}")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {item!r} conflicts with an earlier --set")
        node[parts[-1]] = value
    return out


def _check_type(path: str, value: Any, default: Any) -> None:
    """Refuse a value whose kind differs from its default's (UsageError naming the key).

    A mapping needs a mapping; an int default an integer; a float default a finite number (NaN and inf
    would run to the end and write NaN maps); a bool default true/false; a list default a list. A string
    default (``"auto"``, ``"cv"``, ``"all"``) also takes a finite number; only a null default takes null
    (and anything else).
    """
    import math

    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if default is None:
        return
    if isinstance(default, dict):
        ok, want = isinstance(value, dict), "a mapping of keys"
    elif isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = finite(value), "a finite number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str) or finite(value), "a string or a finite number"
    elif isinstance(default, (list, tuple)):
        ok, want = isinstance(value, (list, tuple)), "a list"
    else:
        return
    if not ok:
        raise UsageError(f"config key '{path}' must be {want} (default {default!r}), got {value!r}")


def check_keys(config: dict, reference: dict, where: str = "") -> None:
    """Refuse keys that the reference (defaults) does not know (a typo must not be silently ignored) and
    values whose type differs from the default's (:func:`_check_type`)."""
    for key, value in config.items():
        path = f"{where}.{key}" if where else key
        if key not in reference:
            known = ", ".join(sorted(reference)) or "none"
            raise UsageError(f"unknown config key '{path}' (known at this level: {known})")
        _check_type(path, value, reference[key])
        if isinstance(value, dict) and isinstance(reference[key], dict) and reference[key]:
            check_keys(value, reference[key], path)


# keys of which a network config uses exactly one (medcfx.nn.unet): a layer that sets one of them replaces the
# other's earlier value by 0, so `--set network.num_head_channels=32` on a preset given in num_heads (the
# sanchez paper preset: one head, as the authors' code) means what it says instead of "set both".
ALTERNATIVES = (("num_head_channels", "num_heads"),)


def resolve(defaults: dict, *layers: dict) -> dict:
    """defaults <- layer1 <- layer2 ..., each layer checked against the defaults' keys; a layer that sets
    one key of an :data:`ALTERNATIVES` pair (and not the other) sets the other to 0 in that node."""
    out = copy.deepcopy(defaults)
    for layer in layers:
        if layer:
            check_keys(layer, defaults)
            out = deep_merge(out, layer)
            _clear_alternatives(out, layer)
    return out


def _clear_alternatives(out: dict, layer: dict) -> None:
    for a, b in ALTERNATIVES:
        for given, other in ((a, b), (b, a)):
            if given in layer and other not in layer and other in out:
                out[other] = 0
    for k, v in layer.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            _clear_alternatives(out[k], v)


def get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
