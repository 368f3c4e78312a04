"""The preprocessing cache: content-keyed folders of memory-mapped ``.npy`` arrays plus ``index.json``.

Where
    :func:`cache_root`: ``$MEDCFX_CACHE`` if set, else ``$MEDCFX_HOME/cache``, else ``~/.medcfx/cache``.
    An entry lives in ``<root>/<key>/``.

Key
    :func:`cache_key` = sha256 of the canonical JSON of: the layout kind, every input file's path relative
    to the dataset root with its size and ``st_mtime_ns``, the preprocessing config and the preprocessing
    version. Only ``stat`` is called on the files, so a cache hit reads no input file. Touching or
    replacing any input, or changing any config value, gives another key (the entry is rebuilt, never
    silently reused).

Atomic builds
    :func:`building` yields a fresh temporary folder (a :mod:`medcfx.staging` name in ``<root>``); it is
    renamed to ``<root>/<key>`` only after the block finished without an exception, and removed otherwise
    (an error in case 7 leaves nothing behind; a killed build is swept by the next build). Arrays are streamed to disk with :class:`NpyWriter`, so the number of
    rows need not be known in advance and memory stays bounded.

Trust
    :func:`open_entry` checks ``index.json`` against the arrays (every file present, shape and dtype as
    recorded, the key equal to the folder name, the version current) and raises :class:`CacheInvalid`
    otherwise; the caller rebuilds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from medcfx import staging
from medcfx.errors import MedcfxError

INDEX = "index.json"


class CacheInvalid(Exception):
    """A cache entry that must not be trusted (incomplete, or index.json disagrees with the arrays)."""


def cache_root() -> Path:
    """``$MEDCFX_CACHE``, else ``$MEDCFX_HOME/cache``, else ``~/.medcfx/cache`` (created if missing)."""
    if os.environ.get("MEDCFX_CACHE"):
        root, var = Path(os.environ["MEDCFX_CACHE"]).expanduser(), "MEDCFX_CACHE"
    elif os.environ.get("MEDCFX_HOME"):
        root, var = Path(os.environ["MEDCFX_HOME"]).expanduser() / "cache", "MEDCFX_HOME"
    else:
        root, var = Path.home() / ".medcfx" / "cache", None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = f" (from ${var})" if var else ""
        raise MedcfxError(f"cannot create the cache folder {root}{where}: {exc.strerror or exc}; set MEDCFX_CACHE to a writable folder") from None
    return root


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form (with ``..`` when it lies outside)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def file_stats(files: Iterable[Path], root: Path) -> list[list]:
    """``[[relative path, size, mtime_ns], ...]`` sorted by path (stat only; nothing is read)."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as exc:
            raise MedcfxError(f"cannot read {f}: {exc.strerror or exc}") from None
        out.append([relative_path(Path(f), root), int(st.st_size), int(st.st_mtime_ns)])
    out.sort(key=lambda r: r[0])
    return out


def cache_key(kind: str, root: Path, files: Iterable[Path], config: dict, version: int) -> str:
    """sha256 (hex) of the canonical JSON of layout kind, file stats, config and preprocessing version."""
    payload = {"kind": kind, "files": file_stats(files, root), "config": config, "version": int(version)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# streaming .npy writer


class NpyWriter:
    """Append rows to an ``.npy`` file whose first dimension grows; the header is fixed up on close.

    The header is written for a placeholder row count with as many digits as any real count can have and
    padded with spaces (the .npy format allows padding), then rewritten in place with the final count at the
    same length, so no data is ever copied.
    """

    _PLACEHOLDER = 10**18

    def __init__(self, path: Path, dtype, tail: tuple[int, ...]):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.tail = tuple(int(t) for t in tail)
        self.rows = 0
        self._fh = open(self.path, "wb")
        self._header_len = len(self._header(self._PLACEHOLDER))
        self._fh.write(self._header(self._PLACEHOLDER))

    def _header(self, rows: int) -> bytes:
        shape = (rows,) + self.tail
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        text = repr(d)
        # magic (6) + version (2) + header length (2) + text + padding + "\n", total a multiple of 64
        total = 10 + len(text) + 1
        pad = (-total) % 64
        if getattr(self, "_header_len", None):
            pad = self._header_len - 10 - len(text) - 1
        body = (text + " " * pad + "\n").encode("latin1")
        return b"\x93NUMPY" + bytes([1, 0]) + len(body).to_bytes(2, "little") + body

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if tuple(rows.shape[1:]) != self.tail:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.tail}")
        self._fh.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> tuple[int, ...]:
        if self._fh.closed:
            return (self.rows,) + self.tail
        head = self._header(self.rows)
        assert len(head) == self._header_len
        self._fh.seek(0)
        self._fh.write(head)
        self._fh.close()
        return (self.rows,) + self.tail

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def save_array(folder: Path, name: str, array: np.ndarray) -> dict:
    """Save a small array as ``<name>.npy`` and return its index record."""
    array = np.ascontiguousarray(array)
    np.save(folder / f"{name}.npy", array, allow_pickle=False)
    return {"shape": list(array.shape), "dtype": array.dtype.str}


# ---------------------------------------------------------------------------------------------------------
# atomic entries


@contextlib.contextmanager
def building(root: Path, key: str) -> Iterator[Path]:
    """Yield a temporary folder (a :mod:`medcfx.staging` name in ``root``); on success it becomes
    ``root/key``, on any exception it is removed.

    Stale temporaries of killed builds in ``root`` are swept first (:func:`medcfx.staging.sweep`). If
    another process finished the same key first, the freshly built copy is discarded (same key = same
    content).
    """
    root.mkdir(parents=True, exist_ok=True)
    staging.sweep(root)
    final = root / key
    tmp = staging.staging_path(final)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / INDEX).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_index(folder: Path, index: dict) -> None:
    """Write ``index.json`` last (atomically): an entry without it is incomplete by definition."""
    staging.atomic_write_bytes(folder / INDEX, json.dumps(index, indent=1, sort_keys=True, allow_nan=True).encode())


def open_entry(folder: Path, version: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Read ``index.json`` and memory-map every array it lists; CacheInvalid if anything disagrees."""
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError) as exc:
        raise CacheInvalid(f"{folder}: index.json unreadable ({type(exc).__name__})") from None
    if not isinstance(index, dict) or index.get("complete") is not True:
        raise CacheInvalid(f"{folder}: index.json not marked complete")
    if index.get("version") != version:
        raise CacheInvalid(f"{folder}: preprocessing version {index.get('version')} != {version}")
    if index.get("key") != folder.name:
        raise CacheInvalid(f"{folder}: index.json key does not match the folder name")
    specs = index.get("arrays")
    if not isinstance(specs, dict) or not specs:
        raise CacheInvalid(f"{folder}: index.json lists no arrays")
    arrays: dict[str, np.ndarray] = {}
    rows = None
    for name, spec in specs.items():
        f = folder / f"{name}.npy"
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CacheInvalid(f"{f}: unreadable ({type(exc).__name__}: {exc})") from None
        if list(arr.shape) != list(spec.get("shape", [])) or arr.dtype.str != spec.get("dtype"):
            raise CacheInvalid(f"{f}: shape/dtype {arr.shape} {arr.dtype.str} != index {spec}")
        if spec.get("rows", True):
            if rows is None:
                rows = arr.shape[0]
            elif arr.shape[0] != rows:
                raise CacheInvalid(f"{f}: {arr.shape[0]} rows, other arrays have {rows}")
        arrays[name] = arr
    if rows != index.get("n"):
        raise CacheInvalid(f"{folder}: index.json says {index.get('n')} rows, arrays have {rows}")
    return index, arrays


def remove_entry(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
