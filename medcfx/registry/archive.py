"""Moving one model between stores: ``medcfx models export`` (a tar archive) and ``medcfx models import``.

An archive holds ``entry.yaml`` (the entry, artifact paths rewritten to ``artifacts/<role><suffix>``) and
the verified artifacts. Import reads it without extracting by member name: absolute paths, '..'
components, links, special files, duplicates and unexpected members are refused; each member's declared
size must equal the entry's recorded bytes before a byte of it is read; every artifact is hashed while it
is copied into a staging folder inside the store and checked against its recorded sha256, and only then
is anything registered.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import zlib
from datetime import datetime
from pathlib import Path, PurePosixPath

import yaml

from medcfx import staging
from medcfx.errors import IntegrityError, MedcfxError
from medcfx.registry.entry import Entry
from medcfx.registry.store import CHUNK, suffix_of

MAX_ENTRY_YAML = 16 << 20  # refuse an entry.yaml larger than this in an imported archive


def export_entry(registry, ref, out: str | Path) -> Path:
    """Write ``out`` (.tar, or .tar.gz / .tgz compressed) holding ``entry.yaml`` and ``artifacts/<role><suffix>``
    for each artifact. Each artifact is hashed while it is packed, so the archive holds exactly the bytes
    that were verified (a mismatch discards it). The archive is staged next to ``out`` and moved into place;
    a new file gets the mode of the umask (an existing one keeps its mode).

    Raises MedcfxError for a bad file name or folder, IntegrityError for an artifact that fails
    verification or whose path leaves the store / catalogue folder."""
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
    if out.is_dir():
        raise MedcfxError(f"export file {out} is a folder")
    entry = registry.resolve(ref)
    record = entry.to_dict()
    files = []
    for role in entry.artifacts:
        src = registry._file_of(entry, role)  # confined; hashed below while it is packed
        member = f"artifacts/{role}{suffix_of(src)}"
        record["artifacts"][role]["path"] = member
        files.append((role, src, member))
    body = yaml.safe_dump(record, sort_keys=False, allow_unicode=True).encode("utf-8")
    with staging.staged_file(out) as tmp:
        with tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("entry.yaml")
            info.size, info.mode, info.mtime = len(body), 0o644, int(datetime.now().timestamp())
            tar.addfile(info, io.BytesIO(body))
            for role, src, member in files:
                rec = entry.artifacts[role]
                try:
                    fh = open(src, "rb")
                except OSError:
                    registry._check(entry, role, src, None, None)  # raises "missing"
                    raise
                with fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size != rec["bytes"]:
                        raise IntegrityError(f"artifact {role} of {entry.ref} is {size} bytes, recorded {rec['bytes']}: "
                                             f"the file is corrupt or was modified ({src})")
                    reader = _HashingReader(fh)
                    info = tarfile.TarInfo(member)
                    info.size, info.mode, info.mtime = size, 0o644, int(os.fstat(fh.fileno()).st_mtime)
                    tar.addfile(info, reader)
                    # the packed bytes are the hashed bytes: a mismatch discards the staged archive
                    registry._check(entry, role, src, reader.h.hexdigest(), reader.n)
    return out


class _HashingReader:
    """A read-only file wrapper that hashes (sha256) and counts every byte read through it."""

    def __init__(self, fh):
        self.fh, self.h, self.n = fh, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.h.update(data)
        self.n += len(data)
        return data


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise MedcfxError(f"import file not found: {path}") from None
    except IsADirectoryError:
        raise MedcfxError(f"import file {path} is a folder, not a .tar / .tar.gz archive") from None
    except tarfile.ReadError:  # every format tried failed: one line, not one per format
        raise MedcfxError(f"import file {path} is not a tar archive (.tar, .tar.gz or .tgz written by "
                          f"`medcfx models export`)") from None
    except (tarfile.TarError, OSError) as exc:
        raise MedcfxError(f"import file {path} cannot be read: {' '.join(str(exc).split())}") from None


def _members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    try:
        listing = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MedcfxError(f"import file {path} is a damaged tar archive: {' '.join(str(exc).split())}") from None
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
    return members


def _read_entry(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], path: Path) -> Entry:
    if "entry.yaml" not in members:
        raise MedcfxError(f"import file {path} has no entry.yaml (not a medcfx model export)")
    if members["entry.yaml"].size > MAX_ENTRY_YAML:
        raise MedcfxError(f"import file {path}: entry.yaml is implausibly large")
    try:
        raw = yaml.safe_load(tar.extractfile(members["entry.yaml"]).read().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MedcfxError(f"import file {path}: entry.yaml is not valid YAML: "
                          f"{' '.join(str(exc).split())}") from None
    try:
        return Entry.from_dict(raw)
    except MedcfxError as exc:
        raise MedcfxError(f"import file {path}: entry.yaml: {exc}") from None


def import_archive(registry, path: str | Path) -> Entry:
    """Register the model in an archive written by :func:`export_entry` under its name with the next free
    version; the source ``name:version`` and creation time are kept in ``provenance.imported_from``.

    Raises MedcfxError for anything that is not a sound archive (one line each), IntegrityError for an
    artifact whose size or sha256 differs from entry.yaml. Nothing is registered or left behind on error:
    the staging folder lives inside the store under the staging rule (:mod:`medcfx.staging`), so even a
    killed import is swept by the next command that writes the store."""
    path = Path(path)
    with _open(path) as tar:
        members = _members(tar, path)
        entry = _read_entry(tar, members, path)
        expected = {"entry.yaml"} | {str(PurePosixPath(a["path"])) for a in entry.artifacts.values()}
        unexpected = sorted(set(members) - expected)
        if unexpected:
            raise MedcfxError(f"import file {path} holds unexpected member '{unexpected[0]}'; refusing to import")
        for role, rec in entry.artifacts.items():
            key = str(PurePosixPath(rec["path"]))
            if key not in members:
                raise MedcfxError(f"import file {path} lacks artifact {role} ('{rec['path']}')")
            if members[key].size != rec["bytes"]:
                raise IntegrityError(f"import file {path}: artifact {role} is {members[key].size} bytes in the "
                                     f"archive but entry.yaml records {rec['bytes']}; nothing was imported")
        try:
            registry.home.mkdir(parents=True, exist_ok=True)
            tmpdir = staging.staging_path(registry.home / "import")
            tmpdir.mkdir()
        except OSError as exc:
            raise MedcfxError(f"model store {registry.home} is not writable ({exc.strerror}); set MEDCFX_HOME "
                              f"to a writable folder") from None
        try:
            files: dict[str, Path] = {}
            for role, rec in entry.artifacts.items():
                dest = tmpdir / f"{role}{suffix_of(rec['path'])}"
                h, left = hashlib.sha256(), rec["bytes"]
                try:
                    with tar.extractfile(members[str(PurePosixPath(rec["path"]))]) as src, open(dest, "wb") as out:
                        while left > 0:  # never more than the recorded size
                            chunk = src.read(min(CHUNK, left))
                            if not chunk:
                                break
                            h.update(chunk)
                            left -= len(chunk)
                            out.write(chunk)
                except (tarfile.TarError, EOFError, zlib.error) as exc:
                    raise MedcfxError(f"import file {path} is a damaged archive (artifact {role}): "
                                      f"{' '.join(str(exc).split())}") from None
                if left or h.hexdigest() != rec["sha256"]:
                    raise IntegrityError(
                        f"import file {path}: artifact {role} failed sha256 verification (expected "
                        f"{rec['sha256'][:12]}..., got {h.hexdigest()[:12]}...): the archive is corrupt or was "
                        f"modified; nothing was imported")
                files[role] = dest
            provenance = dict(entry.provenance)
            provenance["imported_from"] = {"ref": entry.ref, "created": entry.created}
            return registry._register(entry.name, entry.method, files, entry.config, provenance, entry.metrics,
                                      entry.tags, entry.parent, entry.extra, stamp=False)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
