"""Registry entries: what one registered model version records, and the rules its fields obey.

An entry (one item of ``models:`` in a catalogue, see :mod:`medcfx.registry`) is checked field by field
when it is read (:meth:`Entry.from_dict`); a malformed entry raises MedcfxError naming the field. Model
names follow :func:`validate_name`. Nothing here touches the disk except :func:`git_commit`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import medcfx
from medcfx.errors import MedcfxError

MAX_NAME = 100
_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
ROLE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_RESERVED = {"sha256"}  # "sha256:..." is a digest reference
STORED_FIELDS = ("name", "version", "method", "created", "parent", "tags", "artifacts", "config",
                 "provenance", "metrics")
FIXED_FIELDS = ("name", "version", "created", "artifacts", "bundled")


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise MedcfxError naming the rule it breaks.

    Rules: non-empty; no control characters; no path separators; no '..'; at most 100 characters; only
    the characters [A-Za-z0-9._-]; not the reserved word 'sha256' (it would clash with digest refs)."""
    if not isinstance(name, str) or name == "":
        raise MedcfxError("invalid model name '': the name is empty")
    shown = name.encode("unicode_escape").decode("ascii")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise MedcfxError(f"invalid model name '{shown}': it contains a control character")
    if "/" in name or "\\" in name:
        raise MedcfxError(f"invalid model name '{shown}': it contains a path separator ('/' or '\\')")
    if ".." in name or name == ".":
        raise MedcfxError(f"invalid model name '{shown}': it contains '..' (or is '.')")
    if len(name) > MAX_NAME:
        raise MedcfxError(f"invalid model name '{shown[:20]}...': it has {len(name)} characters "
                          f"(at most {MAX_NAME})")
    if not _NAME_CHARS.fullmatch(name):
        bad = "".join(sorted({c for c in name if not _NAME_CHARS.fullmatch(c)}))
        raise MedcfxError(f"invalid model name '{shown}': only letters, digits, '.', '_' and '-' are "
                          f"allowed (found {bad!r})")
    if name.lower() in _RESERVED:
        raise MedcfxError(f"invalid model name '{name}': the name is reserved for digest references")
    return name


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit() -> str | None:
    """HEAD commit of the source checkout medcfx runs from, read from .git without running git."""
    git = Path(medcfx.__file__).resolve().parents[1] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if _HEX40.fullmatch(head) else None
        ref = head[4:].strip()
        loose = git / ref
        if loose.is_file():
            value = loose.read_text().strip()
            return value if _HEX40.fullmatch(value) else None
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref and _HEX40.fullmatch(parts[0]):
                    return parts[0]
    except OSError:
        return None
    return None


def plain(value: Any, where: str) -> Any:
    """Convert to YAML-safe plain data (dict/list/str/int/float/bool/None); Paths become strings and
    numpy/torch scalars become Python numbers. Anything else is refused (no object is pickled)."""
    if value is None:
        return None
    for kind in (bool, int, float, str):  # exact builtin types (np.float64 subclasses float)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item, shape = getattr(value, "item", None), getattr(value, "shape", None)
    if callable(item) and shape is not None and tuple(shape) == ():  # numpy / torch scalars
        return plain(item(), where)
    raise MedcfxError(f"registry field {where} holds a {type(value).__name__}, which cannot be stored "
                      f"(use numbers, strings, lists and dicts)")


@dataclass
class Entry:
    """One registered model version. ``artifacts`` maps a role ("weights", "onnx", "grader", ...) to
    ``{"path": str, "sha256": hex, "bytes": int}``; paths are relative to the store (user entries) or to
    the catalogue's folder (bundled entries). ``extra`` holds any further top-level fields (e.g.
    ``export``). ``bundled`` is derived from where the entry was read and never stored."""

    name: str
    version: int
    method: str
    created: str
    artifacts: dict[str, dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    parent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    bundled: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def digest(self) -> str:
        """sha256 of the "weights" artifact if there is one, else of the first artifact."""
        record = self.artifacts.get("weights") or next(iter(self.artifacts.values()))
        return record["sha256"]

    @property
    def size(self) -> int:
        """Total bytes of all artifacts."""
        return sum(int(a["bytes"]) for a in self.artifacts.values())

    def to_dict(self) -> dict[str, Any]:
        """The stored form (``bundled`` is left out: it is derived)."""
        out: dict[str, Any] = {"name": self.name, "version": self.version, "method": self.method,
                               "created": self.created}
        if self.parent is not None:
            out["parent"] = self.parent
        out["tags"] = list(self.tags)
        out["artifacts"] = copy.deepcopy(self.artifacts)
        out["config"] = copy.deepcopy(self.config)
        out["provenance"] = copy.deepcopy(self.provenance)
        out["metrics"] = copy.deepcopy(self.metrics)
        for key, value in self.extra.items():
            out[key] = copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, data: Any, bundled: bool = False) -> "Entry":
        """Build and check an entry; a malformed one raises MedcfxError saying which field is wrong."""
        if not isinstance(data, dict):
            raise MedcfxError(f"an entry must be a mapping, got {type(data).__name__}")
        label = f"entry {data.get('name', '?')}:{data.get('version', '?')}"
        for key in ("name", "version", "method", "artifacts"):
            if key not in data:
                raise MedcfxError(f"{label} has no '{key}' field")
        name = data["name"]
        if not isinstance(name, str):
            raise MedcfxError(f"{label}: 'name' must be a string")
        validate_name(name)
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise MedcfxError(f"{label}: 'version' must be a positive integer, got {version!r}")
        if not isinstance(data["method"], str) or not data["method"]:
            raise MedcfxError(f"{label}: 'method' must be a non-empty string")
        artifacts = data["artifacts"]
        if not isinstance(artifacts, dict) or not artifacts:
            raise MedcfxError(f"{label}: 'artifacts' must be a non-empty mapping of role -> record")
        for role, rec in artifacts.items():
            if not isinstance(role, str) or not ROLE.fullmatch(role):
                raise MedcfxError(f"{label}: invalid artifact role {role!r}")
            if not isinstance(rec, dict) or not {"path", "sha256", "bytes"} <= set(rec):
                raise MedcfxError(f"{label}: artifact '{role}' needs path, sha256 and bytes")
            if not isinstance(rec["path"], str) or not rec["path"]:
                raise MedcfxError(f"{label}: artifact '{role}' has an invalid path")
            if not isinstance(rec["sha256"], str) or not _HEX64.fullmatch(rec["sha256"]):
                raise MedcfxError(f"{label}: artifact '{role}' sha256 must be 64 lowercase hex digits")
            if isinstance(rec["bytes"], bool) or not isinstance(rec["bytes"], int) or rec["bytes"] < 0:
                raise MedcfxError(f"{label}: artifact '{role}' bytes must be a non-negative integer")
        for key in ("config", "provenance", "metrics"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise MedcfxError(f"{label}: '{key}' must be a mapping")
        tags = data.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise MedcfxError(f"{label}: 'tags' must be a list of strings")
        parent = data.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise MedcfxError(f"{label}: 'parent' must be a 'name:version' string")
        created = data.get("created", "")
        extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in STORED_FIELDS and k != "bundled"}
        return cls(name=name, version=version, method=data["method"], created=str(created),
                   artifacts={r: {"path": a["path"], "sha256": a["sha256"], "bytes": a["bytes"]}
                              for r, a in artifacts.items()},
                   config=replay_intensity_rule(copy.deepcopy(data.get("config") or {})),
                   provenance=copy.deepcopy(data.get("provenance") or {}),
                   metrics=copy.deepcopy(data.get("metrics") or {}),
                   tags=list(tags), parent=parent, extra=extra, bundled=bundled)


def replay_intensity_rule(config: Any) -> Any:
    """Fill ``intensity: legacy`` into every ``preprocess`` mapping of an entry's config that records no rule.

    Models registered before the intensity rule was recorded (:mod:`medcfx.data.intensity`) saw 8-bit
    images divided by 255 and every other image scaled by its percentile: the ``legacy`` rule replays
    exactly that. Returns ``config`` (modified in place).
    """
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "preprocess" and isinstance(value, dict):
                value.setdefault("intensity", "legacy")
            else:
                replay_intensity_rule(value)
    elif isinstance(config, list):
        for value in config:
            replay_intensity_rule(value)
    return config
