"""The Registry: the user's catalogue of entries in ``$MEDCFX_HOME`` plus the read-only bundled catalogue.

See :mod:`medcfx.registry` for the store layout and the contract. Entries are read and written here under
one lock; artifact paths are resolved only through :func:`medcfx.registry.store.confine` and artifact
bytes are handed out only after their size and sha256 were checked.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

import medcfx
from medcfx import staging
from medcfx.config import deep_merge
from medcfx.errors import IntegrityError, MedcfxError
from medcfx.registry.entry import (FIXED_FIELDS, ROLE, STORED_FIELDS, Entry, git_commit, now_utc, plain,
                                   validate_name)
from medcfx.strict_json import NOTES_KEY, finite, warn_nulls
from medcfx.registry.store import (confine, remove_objects, sha256_file, store_object,
                                   sweep_store, unreferenced)

SCHEMA = 1
MIN_PREFIX = 6
_HEADER = "# medcfx model registry, managed by `medcfx models` (artifacts are sha256-verified)\n"


def default_home() -> Path:
    """``$MEDCFX_HOME`` if set (and non-empty), else ``~/.medcfx``."""
    env = os.environ.get("MEDCFX_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".medcfx"


def bundled_catalogue_path() -> Path | None:
    """Where the catalogue of bundled models is: ``$MEDCFX_BUNDLED_REGISTRY`` if set (it must exist),
    else ``<repo root>/registry.yaml`` for a source checkout, else ``<sys.prefix>/share/medcfx/registry.yaml``
    (installed as a data file), else None. Artifact paths in it are confined to its folder."""
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


def _finite(entry: Entry) -> Entry:
    """``entry`` with every NaN / inf (a validation metric over a split without a lesion ...) stored as null,
    the reason under the entry's ``null_values`` field ({"metrics.val_pixel_AUPRC": "NaN: ..."}) and one
    warning line on stderr; notes of values that are numbers again are dropped. A registry entry is shown as
    JSON (``models show --json``), where NaN is not valid."""
    extra = dict(entry.extra)
    prior = extra.pop(NOTES_KEY, None)
    fields, notes = finite({"config": entry.config, "provenance": entry.provenance, "metrics": entry.metrics,
                            **extra})
    warn_nulls(notes, f"model {entry.ref}")
    if isinstance(prior, dict):
        for path, reason in prior.items():
            node: Any = fields
            for part in str(path).split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None and path not in notes:
                notes[path] = reason
    config, provenance, metrics = fields.pop("config"), fields.pop("provenance"), fields.pop("metrics")
    if notes:
        fields[NOTES_KEY] = notes
    return dataclasses.replace(entry, config=config, provenance=provenance, metrics=metrics, extra=fields)


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
                sweep_store(self.home)  # temporaries of writers killed earlier
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
        staging.atomic_write_bytes(self.registry_file, (_HEADER + body).encode("utf-8"))

    def entries(self) -> list[Entry]:
        """User and bundled entries sorted by (name, version). A user entry shadows a bundled entry with
        the same name:version (possible only if the catalogue gained a version after the user's)."""
        user = self._user_entries()
        refs = {e.ref for e in user}
        merged = user + [e for e in self._bundled_entries() if e.ref not in refs]
        return sorted(merged, key=lambda e: (e.name, e.version))

    def newest(self, method: str) -> Entry | None:
        """The model a command of ``method`` uses when no ``--model`` is given: the newest (by ``created``,
        then version) of the user's entries of that method, else the newest bundled one; None if there is
        none."""
        of = [e for e in self.entries() if e.method == method]
        for pool in ([e for e in of if not e.bundled], [e for e in of if e.bundled]):
            if pool:
                return max(pool, key=lambda e: (str(e.created), e.version))
        return None

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
        """The confined path of an artifact: inside the store (user entries) or inside the bundled
        catalogue's folder (bundled entries); IntegrityError for any path that leads elsewhere."""
        if role not in entry.artifacts:
            raise MedcfxError(f"model {entry.ref} has no artifact '{role}' "
                              f"(has: {', '.join(entry.artifacts)})")
        if entry.bundled:
            assert self.bundled_path is not None
            base = self.bundled_path.parent
        else:
            base = self.home
        return confine(base, entry.artifacts[role]["path"], f"artifact {role} of {entry.ref}")

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

    def read_verified(self, entry: Entry, role: str) -> tuple[bytes, Path]:
        """Read an artifact into memory and verify those very bytes: what is used is what was hashed (no
        check-then-use race). Returns (bytes, path); IntegrityError on a missing, corrupt or unconfined
        file."""
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
        data, path = self.read_verified(entry, role)
        try:
            return st_load(data)
        except Exception as exc:  # safetensors raises its own error types for a bad header
            problem = " ".join(str(exc).split())[:200]
            raise MedcfxError(f"artifact {role} of {entry.ref} ({path}) is not a valid safetensors file: "
                              f"{problem}") from None

    def load_json(self, ref_or_entry: str | Entry, role: str) -> dict[str, Any]:
        """Verified JSON artifact -> dict."""
        entry = self.resolve(ref_or_entry)
        data, path = self.read_verified(entry, role)
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

    def unreferenced_objects(self) -> list[Path]:
        """Objects in the store that no user entry references (left by a process killed between storing
        an object and writing registry.yaml, or by an edited registry.yaml)."""
        return unreferenced(self.home, [a["path"] for e in self._user_entries() for a in e.artifacts.values()])

    def remove_unreferenced(self) -> list[Path]:
        """Delete the objects :meth:`unreferenced_objects` lists (under the lock); returns them."""
        with self._lock():
            paths = self.unreferenced_objects()
            remove_objects(self.home, paths)
        return paths

    # ---- writing
    @staticmethod
    def _hash_sources(artifacts: Mapping[str, str | Path]) -> dict[str, tuple[Path, str, int]]:
        if not isinstance(artifacts, Mapping) or not artifacts:
            raise MedcfxError("a model needs at least one artifact (e.g. {'weights': path})")
        out = {}
        for role, src in artifacts.items():
            if not isinstance(role, str) or not ROLE.fullmatch(role):
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

    def derive(self, ref: str | Entry, fields: Mapping[str, Any]) -> Entry:
        """A new version of ``ref``'s name with the same (verified) artifacts, config, provenance, metrics and
        tags, ``fields`` deep-merged into its top-level fields (e.g. ``{"calibration": {...}}``) and
        ``parent`` = ``ref``. Works for bundled models too (their artifacts are copied into the store, so
        the new version lives in the user's registry). Raises IntegrityError if an artifact fails
        verification, MedcfxError for a field that cannot be changed (name, version, artifacts, ...)."""
        fields = plain(dict(fields), "fields")
        for key in fields:
            if key in FIXED_FIELDS or key in ("method", "parent"):
                raise MedcfxError(f"derive: field '{key}' of an entry cannot be set this way")
        entry = self.resolve(ref)
        files = {role: self.artifact_path(entry, role, verify=True) for role in entry.artifacts}
        merged = deep_merge(entry.to_dict(), fields)
        extra = {k: v for k, v in merged.items() if k not in STORED_FIELDS}
        return self._register(entry.name, entry.method, files, merged["config"], merged["provenance"],
                              merged["metrics"], merged["tags"], entry.ref, extra, stamp=False)

    def _register(self, name, method, artifacts, config, provenance, metrics, tags, parent,
                  extra: dict, stamp: bool) -> Entry:
        """register() plus extra top-level fields; ``stamp`` adds this installation's version/commit."""
        validate_name(name)
        if not isinstance(method, str) or not method:
            raise MedcfxError("register: 'method' must be a non-empty string")
        if parent is not None and not isinstance(parent, str):
            raise MedcfxError("register: 'parent' must be a 'name:version' string")
        tags = [tags] if isinstance(tags, str) else [str(t) for t in tags]
        prov = plain(dict(provenance or {}), "provenance")
        if stamp:
            prov.setdefault("medcfx_version", medcfx.__version__)
            if "git_commit" not in prov and (commit := git_commit()):
                prov["git_commit"] = commit
        cfg = plain(dict(config or {}), "config")
        mets = plain(dict(metrics or {}), "metrics")
        extra = plain(extra, "entry")
        sources = self._hash_sources(artifacts)  # hashing outside the lock: the slow part runs in parallel
        with self._lock():
            user = self._user_entries()
            versions = [e.version for e in user + self._bundled_entries() if e.name == name]
            records = {role: {"path": store_object(self.home, path, digest, size), "sha256": digest,
                              "bytes": size}
                       for role, (path, digest, size) in sources.items()}
            entry = _finite(Entry(name=name, version=1 + max(versions, default=0), method=method,
                                  created=now_utc(), artifacts=records, config=cfg, provenance=prov,
                                  metrics=mets, tags=tags, parent=parent, extra=extra))
            self._write(user + [entry])
        return entry

    def add_artifacts(self, ref: str, artifacts: Mapping[str, str | Path],
                      extra: Mapping | None = None) -> Entry:
        """Attach artifacts (e.g. "onnx") to an existing user entry and deep-merge ``extra`` into its fields
        (e.g. ``{"metrics": {...}}`` or ``{"export": {...}}``). A role may be replaced, except the one
        that defines the entry's digest; objects left unreferenced are deleted."""
        extra = plain(dict(extra or {}), "extra")
        for key in extra:
            if key in FIXED_FIELDS:
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
                target.artifacts[role] = {"path": store_object(self.home, path, digest, size), "sha256": digest,
                                          "bytes": size}
            merged = deep_merge(target.to_dict(), extra)
            updated = _finite(Entry.from_dict(merged))
            self._write([updated if e.ref == target.ref else e for e in user])
            self._collect(old_paths, [updated if e.ref == target.ref else e for e in user])
        return updated

    def _collect(self, candidates: set[str], remaining: list[Entry]) -> None:
        """Delete candidate objects that no remaining entry references (caller holds the lock)."""
        referenced = {a["path"] for e in remaining for a in e.artifacts.values()}
        remove_objects(self.home, [self.home / rel for rel in candidates - referenced])

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

    # ---- exchange (medcfx.registry.archive)
    def export(self, ref: str | Entry, out: str | Path) -> Path:
        """Write one model to a .tar / .tar.gz archive; see :func:`medcfx.registry.archive.export_entry`."""
        from medcfx.registry.archive import export_entry

        return export_entry(self, ref, out)

    def import_(self, path: str | Path) -> Entry:
        """Register the model in an archive; see :func:`medcfx.registry.archive.import_archive`."""
        from medcfx.registry.archive import import_archive

        return import_archive(self, path)
