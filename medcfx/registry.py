"""The model registry: named, versioned models whose artifacts are content-addressed and sha256-verified.

Layout of the store (``$MEDCFX_HOME``, default ``~/.medcfx``)::

    registry.yaml                                  the user's entries (schema below)
    registry.lock                                  fcntl.flock target: every read-modify-write holds it
    objects/sha256/<hex[:2]>/<hex><suffix>         artifact bytes, named by their sha256 (suffix kept)

``registry.yaml`` (and the repository's read-only catalogue of BUNDLED models, same format, with artifact
paths relative to the catalogue's folder) looks like::

    schema: 1
    models:
    - name: sanchez-demo
      version: 1
      method: sanchez
      created: '2025-01-01T00:00:00Z'
      artifacts:
        weights: {path: objects/sha256/ab/ab12....safetensors, sha256: ab12..., bytes: 12345}
      config: {network: {...}, diffusion: {...}, preprocessing: {...}}
      provenance: {data_fingerprint: ..., steps: ..., seed: ..., medcfx_version: ..., git_commit: ...}
      metrics: {pixel_AUPRC: 0.61}
      tags: [demo]
      parent: other-model:2          # optional

Contract:

* A reference is ``name`` (latest version), ``name:VERSION`` or ``sha256:PREFIX`` (>= 6 hex digits of an
  entry's digest; the digest is the sha256 of its ``weights`` artifact, else of its first artifact).
* Every artifact is checked against its recorded size and sha256 before it is handed out or loaded.
* Versions of a name are 1 + the largest existing version of that name (user and bundled entries).
* registry.yaml and objects are written to a temporary file in the destination folder and moved into
  place with ``os.replace`` (atomic), so a reader never sees half a file; writers serialise on the lock.
* No pickle: weights are safetensors, everything else YAML (``yaml.safe_*``) or JSON.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

import yaml

import medcfx
from medcfx.config import deep_merge
from medcfx.errors import IntegrityError, MedcfxError

__all__ = [
    "Entry",
    "Registry",
    "bundled_catalogue_path",
    "default_home",
    "git_commit",
    "human_bytes",
    "sha256_file",
    "validate_name",
]

SCHEMA = 1
CHUNK = 1 << 20  # 1 MiB
MAX_NAME = 100
MIN_PREFIX = 6
_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_ROLE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_RESERVED = {"sha256"}  # "sha256:..." is a digest reference
_HEADER = "# medcfx model registry, managed by `medcfx models` (artifacts are sha256-verified)\n"
_STORED_FIELDS = ("name", "version", "method", "created", "parent", "tags", "artifacts", "config",
                  "provenance", "metrics")
_FIXED_FIELDS = ("name", "version", "created", "artifacts", "bundled")
_MAX_ENTRY_YAML = 16 << 20  # refuse an entry.yaml larger than this in an imported archive


# --------------------------------------------------------------------------------------------- helpers
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


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


def default_home() -> Path:
    """``$MEDCFX_HOME`` if set (and non-empty), else ``~/.medcfx``."""
    env = os.environ.get("MEDCFX_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".medcfx"


def bundled_catalogue_path() -> Path | None:
    """Where the catalogue of bundled models is: ``$MEDCFX_BUNDLED_REGISTRY`` if set (it must exist),
    else ``<repo root>/registry.yaml`` for a source checkout, else ``<sys.prefix>/share/medcfx/registry.yaml``
    (installed as a data file), else None."""
    env = os.environ.get("MEDCFX_BUNDLED_REGISTRY", "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise MedcfxError(f"MEDCFX_BUNDLED_REGISTRY={env} is not a file")
        return path
    repo = Path(medcfx.__file__).resolve().parents[1] / "registry.yaml"
    if repo.is_file():
        return repo
    installed = Path(sys.prefix) / "share" / "medcfx" / "registry.yaml"
    return installed if installed.is_file() else None


def _now() -> str:
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


def _plain(value: Any, where: str) -> Any:
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
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item, shape = getattr(value, "item", None), getattr(value, "shape", None)
    if callable(item) and shape is not None and tuple(shape) == ():  # numpy / torch scalars
        return _plain(item(), where)
    raise MedcfxError(f"registry field {where} holds a {type(value).__name__}, which cannot be stored "
                      f"(use numbers, strings, lists and dicts)")


def _suffix(path: str | Path) -> str:
    suffix = Path(path).suffix
    return suffix.lower() if _SUFFIX.fullmatch(suffix) else ""


def _atomic_write_bytes(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------- Entry
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
            if not isinstance(role, str) or not _ROLE.fullmatch(role):
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
        extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in _STORED_FIELDS and k != "bundled"}
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


# -------------------------------------------------------------------------------------------- Registry
class Registry:
    """The model store at ``home`` (default ``default_home()``) plus the read-only bundled catalogue.

    ``bundled``: None -> ``bundled_catalogue_path()``; False -> no bundled models; a path -> that
    catalogue file."""

    def __init__(self, home: str | Path | None = None, bundled: str | Path | None | bool = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        if bundled is None or bundled is True:
            self.bundled_path: Path | None = bundled_catalogue_path()
        elif bundled is False:
            self.bundled_path = None
        else:
            self.bundled_path = Path(bundled).expanduser()
            if not self.bundled_path.is_file():
                raise MedcfxError(f"bundled model catalogue not found: {self.bundled_path}")

    # ---- files
    @property
    def registry_file(self) -> Path:
        return self.home / "registry.yaml"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive advisory lock on <home>/registry.lock for a read-modify-write (not re-entrant)."""
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            fh = open(self.home / "registry.lock", "a+b")
        except OSError as exc:
            raise MedcfxError(f"model store {self.home} is not writable ({exc.strerror}); "
                              f"set MEDCFX_HOME to a writable folder") from None
        with fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _read_catalogue(path: Path, bundled: bool) -> list[Entry]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise MedcfxError(f"cannot read model registry {path}: {exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = " ".join(str(exc).split())
            raise MedcfxError(f"model registry {path} is not valid YAML: {problem}") from None
        if data is None:
            return []
        if not isinstance(data, dict) or not isinstance(data.get("models") or [], list):
            raise MedcfxError(f"model registry {path} must be a mapping with a 'models' list")
        schema = data.get("schema", SCHEMA)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise MedcfxError(f"model registry {path} has schema {schema!r}; this medcfx reads schema "
                              f"{SCHEMA} (upgrade medcfx)")
        entries: list[Entry] = []
        seen: set[str] = set()
        for i, item in enumerate(data.get("models") or []):
            try:
                entry = Entry.from_dict(item, bundled=bundled)
            except MedcfxError as exc:
                raise MedcfxError(f"model registry {path}, models[{i}]: {exc}") from None
            if entry.ref in seen:
                raise MedcfxError(f"model registry {path} lists {entry.ref} twice")
            seen.add(entry.ref)
            entries.append(entry)
        return entries

    def _user_entries(self) -> list[Entry]:
        return self._read_catalogue(self.registry_file, bundled=False)

    def _bundled_entries(self) -> list[Entry]:
        return [] if self.bundled_path is None else self._read_catalogue(self.bundled_path, bundled=True)

    def _write(self, entries: list[Entry]) -> None:
        """Write the user's registry.yaml atomically (caller holds the lock)."""
        body = yaml.safe_dump({"schema": SCHEMA, "models": [e.to_dict() for e in entries]},
                              sort_keys=False, allow_unicode=True)
        _atomic_write_bytes(self.registry_file, (_HEADER + body).encode("utf-8"))

    def entries(self) -> list[Entry]:
        """User and bundled entries sorted by (name, version). A user entry shadows a bundled entry with
        the same name:version (possible only if the catalogue gained a version after the user's)."""
        user = self._user_entries()
        refs = {e.ref for e in user}
        merged = user + [e for e in self._bundled_entries() if e.ref not in refs]
        return sorted(merged, key=lambda e: (e.name, e.version))

    # ---- resolution
    @staticmethod
    def _find(entries: list[Entry], ref: str) -> Entry:
        if not isinstance(ref, str) or not ref.strip():
            raise MedcfxError("empty model reference (use name, name:VERSION or sha256:PREFIX)")
        ref = ref.strip()
        if ref.lower().startswith("sha256:"):
            prefix = ref[7:].lower()
            if not re.fullmatch(r"[0-9a-f]{%d,64}" % MIN_PREFIX, prefix):
                raise MedcfxError(f"invalid digest reference '{ref}': give at least {MIN_PREFIX} hex digits "
                                  f"after 'sha256:'")
            matches = [e for e in entries if e.digest.startswith(prefix)]
            if len(matches) > 1:
                listed = ", ".join(f"{e.ref} ({e.digest[:12]})" for e in matches[:10])
                raise MedcfxError(f"ambiguous model reference '{ref}' matches {len(matches)} models: {listed}; "
                                  f"use a longer prefix or name:version")
            if matches:
                return matches[0]
            raise MedcfxError(f"unknown model '{ref}' (no model has a digest starting with {prefix})")
        name, sep, version = ref.partition(":")
        same = [e for e in entries if e.name == name]
        if sep:
            if not version.isdigit():
                raise MedcfxError(f"invalid model reference '{ref}': the version after ':' must be an integer")
            for e in same:
                if e.version == int(version):
                    return e
            if same:
                versions = ", ".join(str(e.version) for e in same)
                raise MedcfxError(f"unknown model '{ref}' (versions of {name}: {versions})")
        elif same:
            return max(same, key=lambda e: e.version)
        names = sorted({e.name for e in entries})
        if not names:
            raise MedcfxError(f"unknown model '{ref}' (no models are registered)")
        known = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
        raise MedcfxError(f"unknown model '{ref}' (known: {known})")

    def resolve(self, ref: str | Entry) -> Entry:
        """``name`` (latest version) | ``name:VERSION`` | ``sha256:PREFIX`` -> Entry. An Entry is returned
        as is."""
        if isinstance(ref, Entry):
            return ref
        return self._find(self.entries(), ref)

    # ---- artifacts
    def _file_of(self, entry: Entry, role: str) -> Path:
        if role not in entry.artifacts:
            raise MedcfxError(f"model {entry.ref} has no artifact '{role}' "
                              f"(has: {', '.join(entry.artifacts)})")
        rel = entry.artifacts[role]["path"]
        if entry.bundled:
            assert self.bundled_path is not None
            return self.bundled_path.parent / rel
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or "\\" in rel:
            raise IntegrityError(f"artifact {role} of {entry.ref} has path '{rel}' outside the store "
                                 f"{self.home} (registry.yaml was edited?)")
        return self.home / pure

    def _check(self, entry: Entry, role: str, path: Path, digest: str | None, size: int | None) -> None:
        rec = entry.artifacts[role]
        if digest is None:
            raise IntegrityError(f"artifact {role} of {entry.ref} is missing: {path}")
        if size != rec["bytes"] or digest != rec["sha256"]:
            raise IntegrityError(
                f"artifact {role} of {entry.ref} failed sha256 verification (expected "
                f"{rec['sha256'][:12]}..., got {digest[:12]}...): the file is corrupt or was modified "
                f"({path}, {size} bytes, recorded {rec['bytes']})")

    def artifact_path(self, entry_or_ref: str | Entry, role: str = "weights", verify: bool = True) -> Path:
        """Path of an artifact, after checking its size and sha256 (IntegrityError on any mismatch or a
        missing file)."""
        entry = self.resolve(entry_or_ref)
        path = self._file_of(entry, role)
        if verify:
            try:
                size, digest = path.stat().st_size, sha256_file(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                size, digest = None, None
            except OSError as exc:
                raise MedcfxError(f"cannot read artifact {role} of {entry.ref} ({path}): {exc.strerror}") from None
            self._check(entry, role, path, digest, size)
        return path

    def _read_verified(self, entry: Entry, role: str) -> tuple[bytes, Path]:
        """Read an artifact into memory and verify those very bytes (no check-then-use race)."""
        path = self._file_of(entry, role)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._check(entry, role, path, None, None)
            raise AssertionError("unreachable")
        except OSError as exc:
            raise MedcfxError(f"cannot read artifact {role} of {entry.ref} ({path}): {exc.strerror}") from None
        self._check(entry, role, path, hashlib.sha256(data).hexdigest(), len(data))
        return data, path

    def load_tensors(self, ref_or_entry: str | Entry, role: str = "weights") -> dict[str, Any]:
        """Verified safetensors artifact -> ``dict[str, torch.Tensor]`` (on CPU)."""
        from safetensors.torch import load as st_load

        entry = self.resolve(ref_or_entry)
        data, path = self._read_verified(entry, role)
        try:
            return st_load(data)
        except Exception as exc:  # safetensors raises its own error types for a bad header
            problem = " ".join(str(exc).split())[:200]
            raise MedcfxError(f"artifact {role} of {entry.ref} ({path}) is not a valid safetensors file: "
                              f"{problem}") from None

    def load_json(self, ref_or_entry: str | Entry, role: str) -> dict[str, Any]:
        """Verified JSON artifact -> dict."""
        entry = self.resolve(ref_or_entry)
        data, path = self._read_verified(entry, role)
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MedcfxError(f"artifact {role} of {entry.ref} ({path}) is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise MedcfxError(f"artifact {role} of {entry.ref} ({path}) holds JSON {type(value).__name__}, "
                              f"expected an object")
        return value

    def verify(self, ref: str | Entry | None = None) -> list[tuple[str, str]]:
        """Check every artifact of one entry (or of all entries): [(ref, problem), ...]; [] = all good."""
        entries = [self.resolve(ref)] if ref is not None else self.entries()
        problems: list[tuple[str, str]] = []
        for entry in entries:
            for role in entry.artifacts:
                try:
                    self.artifact_path(entry, role, verify=True)
                except MedcfxError as exc:
                    problems.append((entry.ref, str(exc)))
        return problems

    # ---- writing
    def _store_object(self, src: Path, digest: str, size: int) -> str:
        """Copy ``src`` (already hashed as ``digest``) into the object store; returns the relative path.
        Caller holds the lock. The copy is re-hashed while writing, so a source that changed in between
        is refused; an existing object is kept if it verifies and replaced (healed) if it does not."""
        rel = PurePosixPath("objects", "sha256", digest[:2], digest + _suffix(src))
        dest = self.home / rel
        if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == digest:
            return str(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, open(src, "rb") as fh:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != digest:
                raise MedcfxError(f"artifact file {src} changed while it was being registered")
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(rel)

    @staticmethod
    def _hash_sources(artifacts: Mapping[str, str | Path]) -> dict[str, tuple[Path, str, int]]:
        if not isinstance(artifacts, Mapping) or not artifacts:
            raise MedcfxError("a model needs at least one artifact (e.g. {'weights': path})")
        out = {}
        for role, src in artifacts.items():
            if not isinstance(role, str) or not _ROLE.fullmatch(role):
                raise MedcfxError(f"invalid artifact role {role!r}: use letters, digits, '_' and '-'")
            path = Path(src)
            if not path.is_file():
                raise MedcfxError(f"artifact '{role}': file not found: {path}")
            out[role] = (path, sha256_file(path), path.stat().st_size)
        return out

    def register(self, name: str, method: str, artifacts: Mapping[str, str | Path],
                 config: Mapping | None = None, provenance: Mapping | None = None,
                 metrics: Mapping | None = None, tags: tuple[str, ...] | list[str] = (),
                 parent: str | None = None) -> Entry:
        """Store the artifacts and add ``name:<next version>``. ``provenance`` gets ``medcfx_version`` and
        (when a git checkout is found) ``git_commit`` unless given."""
        return self._register(name, method, artifacts, config, provenance, metrics, tags, parent, {}, True)

    def _register(self, name, method, artifacts, config, provenance, metrics, tags, parent,
                  extra: dict, stamp: bool) -> Entry:
        """register() plus extra top-level fields; ``stamp`` adds this installation's version/commit."""
        validate_name(name)
        if not isinstance(method, str) or not method:
            raise MedcfxError("register: 'method' must be a non-empty string")
        if parent is not None and not isinstance(parent, str):
            raise MedcfxError("register: 'parent' must be a 'name:version' string")
        tags = [tags] if isinstance(tags, str) else [str(t) for t in tags]
        prov = _plain(dict(provenance or {}), "provenance")
        if stamp:
            prov.setdefault("medcfx_version", medcfx.__version__)
            if "git_commit" not in prov and (commit := git_commit()):
                prov["git_commit"] = commit
        cfg = _plain(dict(config or {}), "config")
        mets = _plain(dict(metrics or {}), "metrics")
        extra = _plain(extra, "entry")
        sources = self._hash_sources(artifacts)  # hashing outside the lock: the slow part runs in parallel
        with self._lock():
            user = self._user_entries()
            versions = [e.version for e in user + self._bundled_entries() if e.name == name]
            records = {role: {"path": self._store_object(path, digest, size), "sha256": digest,
                              "bytes": size}
                       for role, (path, digest, size) in sources.items()}
            entry = Entry(name=name, version=1 + max(versions, default=0), method=method, created=_now(),
                          artifacts=records, config=cfg, provenance=prov, metrics=mets, tags=tags,
                          parent=parent, extra=extra)
            self._write(user + [entry])
        return entry

    def add_artifacts(self, ref: str, artifacts: Mapping[str, str | Path],
                      extra: Mapping | None = None) -> Entry:
        """Attach artifacts (e.g. "onnx") to an existing user entry and deep-merge ``extra`` into its fields
        (e.g. ``{"metrics": {...}}`` or ``{"export": {...}}``). A role may be replaced, except the one
        that defines the entry's digest; objects left unreferenced are deleted."""
        extra = _plain(dict(extra or {}), "extra")
        for key in extra:
            if key in _FIXED_FIELDS:
                raise MedcfxError(f"add_artifacts: field '{key}' of an entry cannot be changed")
        sources = self._hash_sources(artifacts) if artifacts else {}
        with self._lock():
            user = self._user_entries()
            target = self._find(user + self._bundled_entries(), ref)
            if target.bundled:
                raise MedcfxError(f"{target.ref} is a bundled model ({self.bundled_path}) and is read-only")
            digest_role = "weights" if "weights" in target.artifacts else next(iter(target.artifacts))
            if digest_role in sources:
                raise MedcfxError(f"add_artifacts: {target.ref} already has '{digest_role}', which defines its "
                                  f"digest; register a new version instead")
            old_paths = {a["path"] for a in target.artifacts.values()}
            for role, (path, digest, size) in sources.items():
                target.artifacts[role] = {"path": self._store_object(path, digest, size), "sha256": digest,
                                          "bytes": size}
            merged = deep_merge(target.to_dict(), extra)
            updated = Entry.from_dict(merged)
            self._write([updated if e.ref == target.ref else e for e in user])
            self._collect(old_paths, [updated if e.ref == target.ref else e for e in user])
        return updated

    def _collect(self, candidates: set[str], remaining: list[Entry]) -> None:
        """Delete candidate objects that no remaining entry references (caller holds the lock)."""
        referenced = {a["path"] for e in remaining for a in e.artifacts.values()}
        objects = (self.home / "objects").resolve()
        for rel in candidates - referenced:
            path = (self.home / rel).resolve()
            if objects not in path.parents:
                continue  # never delete outside the object store
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # the <hex[:2]> folder, if now empty
            except OSError:
                pass

    def remove(self, ref: str) -> Entry:
        """Remove one entry (``name`` alone = its latest version) and the objects no other entry uses.
        Bundled entries cannot be removed."""
        with self._lock():
            user = self._user_entries()
            target = self._find(user + self._bundled_entries(), ref)
            if target.bundled:
                raise MedcfxError(f"{target.ref} is a bundled model (listed in {self.bundled_path}) and cannot "
                                  f"be removed")
            remaining = [e for e in user if e.ref != target.ref]
            self._write(remaining)
            self._collect({a["path"] for a in target.artifacts.values()}, remaining)
        return target

    # ---- exchange
    def export(self, ref: str | Entry, out: str | Path) -> Path:
        """Write ``out`` (.tar, or .tar.gz/.tgz compressed) holding ``entry.yaml`` and
        ``artifacts/<role><suffix>`` for each artifact, after verifying them."""
        entry = self.resolve(ref)
        out = Path(out)
        name = out.name.lower()
        if name.endswith((".tar.gz", ".tgz")):
            mode = "w:gz"
        elif name.endswith(".tar"):
            mode = "w"
        else:
            raise MedcfxError(f"export file {out} must end in .tar, .tar.gz or .tgz")
        if not out.parent.is_dir():
            raise MedcfxError(f"export folder does not exist: {out.parent}")
        record = entry.to_dict()
        files = []
        for role in entry.artifacts:
            src = self.artifact_path(entry, role, verify=True)
            member = f"artifacts/{role}{_suffix(src)}"
            record["artifacts"][role]["path"] = member
            files.append((src, member))
        body = yaml.safe_dump(record, sort_keys=False, allow_unicode=True).encode("utf-8")
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo("entry.yaml")
                info.size, info.mode, info.mtime = len(body), 0o644, int(datetime.now().timestamp())
                tar.addfile(info, io.BytesIO(body))
                for src, member in files:
                    info = tarfile.TarInfo(member)
                    info.size, info.mode, info.mtime = src.stat().st_size, 0o644, int(src.stat().st_mtime)
                    with open(src, "rb") as fh:
                        tar.addfile(info, fh)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

    def import_(self, path: str | Path) -> Entry:
        """Register the model in an archive written by ``export`` under its name with the next free version.

        The archive is read without extracting by member name: absolute paths, '..' components, links and
        special files are refused, every artifact is checked against the sha256 and size in entry.yaml,
        and only then is anything registered. The source ``name:version`` and creation time are kept in
        ``provenance.imported_from``."""
        path = Path(path)
        try:
            tar = tarfile.open(path, "r:*")
        except FileNotFoundError:
            raise MedcfxError(f"import file not found: {path}") from None
        except (tarfile.TarError, OSError) as exc:
            raise MedcfxError(f"import file {path} is not a readable tar archive: {exc}") from None
        with tar, tempfile.TemporaryDirectory(prefix="medcfx-import-") as tmpdir:
            members: dict[str, tarfile.TarInfo] = {}
            try:
                listing = tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise MedcfxError(f"import file {path} is a damaged tar archive: {exc}") from None
            for m in listing:
                pure = PurePosixPath(m.name)
                if (m.name.startswith(("/", "\\")) or pure.is_absolute() or ".." in pure.parts
                        or "\\" in m.name or ":" in m.name):
                    raise MedcfxError(f"import file {path} holds an unsafe member '{m.name}' (absolute path or "
                                      f"'..'); refusing to import")
                if m.issym() or m.islnk():
                    raise MedcfxError(f"import file {path} holds a link '{m.name}'; refusing to import")
                if m.isdir():
                    continue
                if not m.isfile():
                    raise MedcfxError(f"import file {path} holds a special file '{m.name}'; refusing to import")
                key = str(pure)
                if key in members:
                    raise MedcfxError(f"import file {path} holds '{key}' twice; refusing to import")
                members[key] = m
            if "entry.yaml" not in members:
                raise MedcfxError(f"import file {path} has no entry.yaml (not a medcfx model export)")
            if members["entry.yaml"].size > _MAX_ENTRY_YAML:
                raise MedcfxError(f"import file {path}: entry.yaml is implausibly large")
            try:
                raw = yaml.safe_load(tar.extractfile(members["entry.yaml"]).read().decode("utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as exc:
                raise MedcfxError(f"import file {path}: entry.yaml is not valid YAML: "
                                  f"{' '.join(str(exc).split())}") from None
            try:
                entry = Entry.from_dict(raw)
            except MedcfxError as exc:
                raise MedcfxError(f"import file {path}: entry.yaml: {exc}") from None
            expected = {"entry.yaml"} | {str(PurePosixPath(a["path"])) for a in entry.artifacts.values()}
            unexpected = sorted(set(members) - expected)
            if unexpected:
                raise MedcfxError(f"import file {path} holds unexpected member '{unexpected[0]}'; "
                                  f"refusing to import")
            files: dict[str, Path] = {}
            for role, rec in entry.artifacts.items():
                key = str(PurePosixPath(rec["path"]))
                if key not in members:
                    raise MedcfxError(f"import file {path} lacks artifact {role} ('{rec['path']}')")
                dest = Path(tmpdir) / f"{role}{_suffix(key)}"
                h, size = hashlib.sha256(), 0
                with tar.extractfile(members[key]) as src, open(dest, "wb") as out:
                    for chunk in iter(lambda: src.read(CHUNK), b""):
                        h.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if h.hexdigest() != rec["sha256"] or size != rec["bytes"]:
                    raise IntegrityError(
                        f"import file {path}: artifact {role} failed sha256 verification (expected "
                        f"{rec['sha256'][:12]}..., got {h.hexdigest()[:12]}...): the archive is corrupt or "
                        f"was modified; nothing was imported")
                files[role] = dest
            provenance = dict(entry.provenance)
            provenance["imported_from"] = {"ref": entry.ref, "created": entry.created}
            return self._register(entry.name, entry.method, files, entry.config, provenance, entry.metrics,
                                  entry.tags, entry.parent, entry.extra, stamp=False)
