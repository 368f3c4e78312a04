"""Atomic writes and the one naming rule for temporaries, so that killed runs leave nothing behind for good.

Every file or folder medcfx builds is first written under a *staging name* in the destination's own folder
and moved into place with ``os.replace`` (atomic on POSIX), so a reader never sees half a file::

    .medcfx-tmp-<pid>-<host8>-<rand8>-<final name>

``pid`` is the writing process, ``host8`` the first 8 hex digits of sha256(hostname) (stores on shared
file systems are written from several machines), ``rand8`` makes names unique within a process. A process
killed with SIGKILL cannot clean up, so later commands call :func:`sweep` on the folders they write to:
a temporary is stale when its process no longer runs on this host, or, for a temporary of another host
(whose processes cannot be seen from here), when it is older than :data:`FOREIGN_STALE_S`.

Written files get the mode the destination already had, or else the mode the umask gives a new file
(``tempfile.mkstemp`` would leave 0600 and hide a group-shared store from the group).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["PREFIX", "atomic_write_bytes", "new_file_mode", "staged_file", "staged_folder", "staging_path",
           "sweep"]

PREFIX = ".medcfx-tmp-"
FOREIGN_STALE_S = 24 * 3600  # a temporary written on another host is removed after a day
_NAME = re.compile(r"\.medcfx-tmp-(\d+)-([0-9a-f]{8})-[0-9a-f]{8}-")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def staging_path(final: str | Path) -> Path:
    """The staging name of ``final`` in the same folder (same file system, so ``os.replace`` is atomic)."""
    final = Path(final)
    return final.with_name(f"{PREFIX}{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}-{final.name}")


def new_file_mode() -> int:
    """Mode a new regular file gets under the current umask (0o666 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _mode_for(dest: Path, mode: int | None) -> int:
    if mode is not None:
        return mode
    try:
        return dest.stat().st_mode & 0o7777
    except OSError:
        return new_file_mode()


@contextlib.contextmanager
def staged_file(dest: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a staging path for ``dest``; when the block ends without an exception the file written there
    is fsync'ed, given ``mode`` (default: ``dest``'s current mode, else the umask's) and moved onto
    ``dest``; on any exception (KeyboardInterrupt included) it is removed."""
    dest = Path(dest)
    tmp = staging_path(dest)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(dest, mode))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(dest: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``dest`` atomically (see :func:`staged_file` for the mode)."""
    with staged_file(dest, mode) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """Yield a fresh staging folder for ``final``; on success it replaces ``final`` (an existing folder is
    moved aside under a staging name first and then removed), on any exception it is removed."""
    final = Path(final)
    tmp = staging_path(final)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = staging_path(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def sweep(folder: str | Path, now: float | None = None) -> list[Path]:
    """Remove the stale temporaries directly inside ``folder``; returns what was removed.

    A temporary (a name matching the staging rule) is stale when it was written on this host by a process
    that no longer runs, or on another host more than :data:`FOREIGN_STALE_S` seconds ago. Temporaries of
    running processes and every other name in the folder are never touched. A missing or unreadable
    folder is not an error."""
    folder = Path(folder)
    now = time.time() if now is None else now
    host = _host_tag()
    removed: list[Path] = []
    try:
        children = list(folder.iterdir())
    except OSError:
        return removed
    for path in children:
        m = _NAME.match(path.name)
        if m is None:
            continue
        pid, owner = int(m.group(1)), m.group(2)
        try:
            age = now - path.lstat().st_mtime
        except OSError:
            continue
        stale = (not _running(pid)) if owner == host else age > FOREIGN_STALE_S
        if not stale:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(path)
    return removed
