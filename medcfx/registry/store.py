"""The object store: content-addressed artifact files, and the one rule that confines every stored path.

Objects live at ``<home>/objects/sha256/<hex[:2]>/<hex><suffix>``. Every path read from a catalogue (the
user's ``registry.yaml``, the bundled catalogue, an imported archive's ``entry.yaml``) and every file name
an entry declares (ONNX external-data names) goes through :func:`confine` before it is opened, so no
catalogue can make medcfx read, pack or write a file outside its own folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import Iterable

from medcfx import staging
from medcfx.errors import IntegrityError, MedcfxError

CHUNK = 1 << 20  # 1 MiB
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}")
_OBJECT = re.compile(r"[0-9a-f]{64}(\.[a-z0-9]{1,16})?")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def suffix_of(path: str | Path) -> str:
    """The lower-case suffix kept on a stored object ('.safetensors'), or '' when it is not plain."""
    suffix = Path(path).suffix
    return suffix.lower() if _SUFFIX.fullmatch(suffix) else ""


def confine(base: Path, rel: str, what: str) -> Path:
    """``base / rel`` if ``rel`` names a file inside ``base``, else IntegrityError naming ``what``.

    ``rel`` must be a relative POSIX path without '..', backslashes or control characters, and the path
    it names must stay inside ``base`` once symbolic links are resolved (a link inside the store that
    points elsewhere is refused too)."""
    pure = PurePosixPath(rel) if isinstance(rel, str) else None
    if (pure is None or not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel
            or any(ord(c) < 32 or ord(c) == 127 for c in rel)):
        shown = str(rel).encode("unicode_escape").decode("ascii")
        raise IntegrityError(f"{what} has path '{shown}', which is not a relative path inside {base}; "
                             f"refusing to use it (was the catalogue edited?)")
    path = base / pure
    root = base.resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise IntegrityError(f"{what} has path '{rel}', which leads outside {base} (to {real}); refusing to "
                             f"use it")
    return path


def confine_file_name(name: str, what: str) -> str:
    """``name`` if it is a plain file name (no folder part, not '.' or '..'), else IntegrityError."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise IntegrityError(f"{what} names the file {name!r}, which is not a plain file name; refusing to "
                             f"use it")
    return name


def store_object(home: Path, src: Path, digest: str, size: int) -> str:
    """Copy ``src`` (already hashed as ``digest``) into the store at ``home``; returns the relative path.

    The caller holds the registry lock. The copy is re-hashed while it is written, so a source that
    changed in between is refused; an existing object is kept if it verifies and replaced (healed) if not.
    Objects are read-only (0444)."""
    rel = PurePosixPath("objects", "sha256", digest[:2], digest + suffix_of(src))
    dest = home / rel
    if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == digest:
        return str(rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staging.staged_file(dest, mode=0o444) as tmp:
        h = hashlib.sha256()
        with open(tmp, "wb") as out, open(src, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            raise MedcfxError(f"artifact file {src} changed while it was being registered")
    return str(rel)


def object_files(home: Path) -> list[Path]:
    """Every stored object (not temporaries) under ``home/objects/sha256``."""
    root = home / "objects" / "sha256"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("??/*") if p.is_file() and _OBJECT.fullmatch(p.name))


def unreferenced(home: Path, referenced: Iterable[str]) -> list[Path]:
    """Stored objects that no path in ``referenced`` (store-relative) names."""
    used = {(home / PurePosixPath(rel)).resolve() for rel in referenced}
    return [p for p in object_files(home) if p.resolve() not in used]


def remove_objects(home: Path, paths: Iterable[Path]) -> None:
    """Delete objects (only ever inside ``home/objects``) and the ``<hex[:2]>`` folders left empty."""
    objects = (home / "objects").resolve()
    for path in paths:
        path = Path(path).resolve()
        if objects not in path.parents:
            continue  # never delete outside the object store
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass


def sweep_store(home: Path) -> list[Path]:
    """Remove the temporaries of dead writers in the store (its top folder and every object folder)."""
    removed = staging.sweep(home)
    root = home / "objects" / "sha256"
    if root.is_dir():
        for folder in root.iterdir():
            if folder.is_dir():
                removed += staging.sweep(folder)
    return removed

