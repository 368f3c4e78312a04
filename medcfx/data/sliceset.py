"""The cached slice set: preprocessed slices of a dataset, memory-mapped read-only from a cache entry.

:func:`medcfx.data.preprocess.prepare` builds an entry; :class:`SliceSet` reads it (rows, labels, masks) and
maps a case's model slices back onto its input grid (:meth:`SliceSet.to_original`, :meth:`SliceSet.write_case`:
the input's own voxel order and affine, through :class:`~medcfx.data.geometry.SliceGeometry`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcfx.data import cache as cachemod
from medcfx.data.geometry import SliceGeometry
from medcfx.data.io import write_nifti
from medcfx.errors import MedcfxError

# version of the preprocessing and its cache entries; 2: canonical (RAS+) slicing with the orientation in
# each geometry, foreground from the data, the recorded intensity rule
PREPROCESS_VERSION = 2


class RowView:
    """Lazy rows ``base[rows[i]]`` of a memory-mapped array (what :meth:`SliceSet.subset` hands out)."""

    def __init__(self, base: np.ndarray, rows: np.ndarray):
        self.base, self.rows = base, rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows),) + tuple(self.base.shape[1:])

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            first, rest = key[0], key[1:]
        else:
            first, rest = key, ()
        sel = self.rows[first]
        if np.ndim(sel) == 0:
            out = self.base[int(sel)]
        else:
            order = np.argsort(sel, kind="stable")
            inv = np.empty_like(order)
            inv[order] = np.arange(len(order))
            out = np.asarray(self.base[np.asarray(sel)[order]])[inv]
        return out[rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self[:])
        return out.astype(dtype) if dtype is not None else out


class SliceSet:
    """Preprocessed slices of a dataset (read-only, memory-mapped from a cache entry).

    Per row i (N rows): ``images[i]`` float32 [C, S, S] in [-1, 1]; ``labels[i]`` float32 [K] (1, 0, NaN =
    unlabelled); ``masks[i]`` uint8 [S, S] (None when the dataset has no masks; ``has_mask[i]`` says whether
    row i's mask is known); ``grade[i]`` (NaN = none); ``bbox[name][i]`` (x0, y0, x1, y1) in model pixels
    (NaN = none); ``case_ids[i]``, ``slice_index[i]`` (original slice index; 0 for 2D), ``split[i]``
    ('' = none). Per case: :meth:`geometry`, :meth:`affine`, :meth:`reference`, :meth:`to_original`,
    :meth:`write_case`.
    """

    def __init__(self, folder: Path, index: dict, arrays: dict[str, np.ndarray], rows: np.ndarray | None = None,
                 root: Path | None = None):
        self.path = Path(folder)
        # the dataset folder: where it is now (a moved dataset keeps its key), else where it was built from
        self._root = Path(root) if root is not None else Path(index["root"])
        self._index = index
        self._arrays = arrays
        self._rows = rows  # None = every row
        self._cases = index["cases"]
        self._case_pos = {c["id"]: i for i, c in enumerate(self._cases)}
        self._geoms = [SliceGeometry.from_dict(g) for g in index["geometries"]]

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, root: str | Path | None = None) -> "SliceSet":
        """Open a cache entry; a MedcfxError if it is incomplete or inconsistent.

        ``root``: the dataset folder now, if it moved since the entry was built (for :meth:`reference`).
        """
        try:
            return open_checked(Path(folder), Path(root) if root is not None else None)
        except cachemod.CacheInvalid as exc:
            raise MedcfxError(f"invalid preprocessed data: {exc}") from None

    def _rowsel(self, name: str):
        arr = self._arrays.get(name)
        if arr is None:
            return None
        return arr if self._rows is None else RowView(arr, self._rows)

    def _small(self, name: str) -> np.ndarray | None:
        arr = self._arrays.get(name)
        if arr is None:
            return None
        arr = np.asarray(arr)
        return arr if self._rows is None else arr[self._rows]

    # -- arrays ---------------------------------------------------------------------------------------
    @property
    def images(self):
        return self._rowsel("images")

    @property
    def masks(self):
        return self._rowsel("masks")

    @property
    def labels(self) -> np.ndarray:
        return self._small("labels")

    @property
    def has_mask(self) -> np.ndarray:
        return self._small("has_mask").astype(bool)

    @property
    def grade(self) -> np.ndarray:
        return self._small("grade")

    @property
    def bbox(self) -> dict[str, np.ndarray] | None:
        arr = self._small("bbox")
        if arr is None:
            return None
        return {name: arr[:, k] for k, name in enumerate(self.label_names)}

    @property
    def case_index(self) -> np.ndarray:
        return self._small("case_index")

    @property
    def case_ids(self) -> np.ndarray:
        ids = np.array([c["id"] for c in self._cases], dtype=object)
        return ids[self.case_index] if len(ids) else np.array([], dtype=object)

    @property
    def slice_index(self) -> np.ndarray:
        return self._small("slice_index")

    @property
    def split(self) -> np.ndarray:
        sp = np.array([c.get("split") or "" for c in self._cases], dtype=object)
        return sp[self.case_index] if len(sp) else np.array([], dtype=object)

    # -- metadata -------------------------------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        return list(self._index["label_names"])

    @property
    def channels(self) -> list[str]:
        return list(self._index["channels"])

    @property
    def fingerprint(self) -> str:
        return self._index["key"]

    @property
    def config(self):
        """The :class:`~medcfx.data.preprocess.PreprocessConfig` the entry was built with."""
        from medcfx.data.preprocess import PreprocessConfig

        return PreprocessConfig.from_dict(self._index["config"])

    @property
    def kind(self) -> str:
        return self._index["kind"]

    @property
    def notes(self) -> dict[str, int]:
        """What the readers and the preprocessing changed or assumed: note -> number of cases."""
        return dict(self._index.get("notes", {}))

    @property
    def source(self) -> Path:
        """The dataset folder (input files are relative to it)."""
        return self._root

    @property
    def size(self) -> int:
        return int(self._index["config"]["size"])

    @property
    def dims(self) -> int:
        return int(self._index["dims"])

    @property
    def cases(self) -> list[str]:
        """Case ids present in this set, in order of first appearance."""
        ci = self.case_index
        seen = list(dict.fromkeys(ci.tolist()))
        return [self._cases[i]["id"] for i in seen]

    def __len__(self) -> int:
        return int(self._index["n"]) if self._rows is None else len(self._rows)

    def __repr__(self) -> str:
        return (f"SliceSet({len(self)} slices of {len(self.cases)} cases, channels={self.channels}, "
                f"size={self.size}, labels={self.label_names}, kind={self.kind})")

    def __getitem__(self, i: int) -> dict:
        """One row as a dict: image, label, mask (or None), has_mask, grade, case_id, slice_index."""
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        r = i if self._rows is None else int(self._rows[i])
        a = self._arrays
        case = int(a["case_index"][r])
        return {
            "image": np.array(a["images"][r]),
            "label": np.array(a["labels"][r]),
            "mask": np.array(a["masks"][r]) if "masks" in a else None,
            "has_mask": bool(a["has_mask"][r]),
            "grade": float(a["grade"][r]),
            "case_id": self._cases[case]["id"],
            "slice_index": int(a["slice_index"][r]),
        }

    def subset(self, idx) -> "SliceSet":
        """Rows ``idx`` (int indices or a boolean mask over this set) as a new SliceSet (no data copied)."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean subset needs {len(self)} entries, got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError("subset index out of range")
        idx = np.where(idx < 0, idx + len(self), idx)
        base = np.arange(int(self._index["n"])) if self._rows is None else self._rows
        return SliceSet(self.path, self._index, self._arrays, base[idx], root=self._root)

    def split_subset(self, split: str) -> "SliceSet":
        """The rows whose case has ``split`` ('train', 'val', 'test')."""
        return self.subset(self.split == split)

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Per label: positive, negative and unlabelled row counts."""
        lab = self.labels
        out = {}
        for k, name in enumerate(self.label_names):
            col = lab[:, k]
            out[name] = {
                "positive": int(np.sum(col == 1)),
                "negative": int(np.sum(col == 0)),
                "unlabelled": int(np.sum(np.isnan(col))),
            }
        return out

    # -- per case -------------------------------------------------------------------------------------
    def _case(self, case_id: str) -> dict:
        if case_id not in self._case_pos:
            raise MedcfxError(f"unknown case {case_id!r} in {self.source}")
        return self._cases[self._case_pos[case_id]]

    def case_rows(self, case_id: str) -> np.ndarray:
        """Row indices (into this set) of the case's slices, ordered by slice index."""
        pos = self._case_pos.get(case_id)
        if pos is None:
            raise MedcfxError(f"unknown case {case_id!r} in {self.source}")
        rows = np.flatnonzero(self.case_index == pos)
        return rows[np.argsort(self.slice_index[rows], kind="stable")]

    def geometry(self, case_id: str) -> SliceGeometry:
        return self._geoms[self._case(case_id)["geometry"]]

    def affine(self, case_id: str) -> np.ndarray | None:
        a = self._case(case_id).get("affine")
        return None if a is None else np.asarray(a, dtype=np.float64)

    def reference(self, case_id: str) -> Path:
        """The case's first input file (its NIfTI header/affine is the grid outputs are written on)."""
        return self._root / self._case(case_id)["ref"]

    def to_original(self, case_id: str, slices: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Model slices of a case ([n, C, S, S] or [n, S, S], in :meth:`case_rows` order) on the original grid.

        ``n`` may be all of the case's slices in the full set or those present in this subset; missing
        slices are ``fill``.
        """
        rows = self.case_rows(case_id)
        return self.geometry(case_id).to_original(slices, fill=fill, index=self.slice_index[rows])

    def write_case(self, case_id: str, slices: np.ndarray, path: str | Path, fill: float = 0.0) -> Path:
        """Write one case's model slices ([n, S, S]) as NIfTI aligned with the input (its affine/header)."""
        geom = self.geometry(case_id)
        if geom.is_2d:
            raise MedcfxError(f"case {case_id} is a 2D image; write it as an image, not NIfTI")
        vol = self.to_original(case_id, np.asarray(slices), fill=fill)
        if vol.ndim != 3:
            raise MedcfxError(f"write_case takes one channel ([n, S, S]); got slices of shape {np.shape(slices)}")
        return write_nifti(path, vol.astype(np.float32), like=self.reference(case_id))



_REQUIRED = ("images", "labels", "has_mask", "grade", "case_index", "slice_index")


def open_checked(entry: Path, root: Path | None) -> SliceSet:
    """Open an entry and check index.json's own records against the arrays (CacheInvalid otherwise)."""
    index, arrays = cachemod.open_entry(entry, PREPROCESS_VERSION)
    try:
        missing = [a for a in _REQUIRED if a not in arrays]
        if missing:
            raise ValueError(f"arrays missing: {missing}")
        n, C, S, S2 = arrays["images"].shape
        ncase, ngeom = len(index["cases"]), len(index["geometries"])
        ok = (
            S == S2 == int(index["config"]["size"])
            and C == len(index["channels"])
            and arrays["labels"].shape == (n, len(index["label_names"]))
            and ("masks" not in arrays or arrays["masks"].shape == (n, S, S))
            and (n == 0 or 0 <= int(np.min(arrays["case_index"])) <= int(np.max(arrays["case_index"])) < ncase)
            and all(0 <= int(c["geometry"]) < ngeom for c in index["cases"])
        )
        if not ok:
            raise ValueError("index.json does not describe its arrays")
        return SliceSet(entry, index, arrays, root=root)
    except (KeyError, TypeError, ValueError) as exc:
        raise cachemod.CacheInvalid(f"{entry}: {exc}") from None
