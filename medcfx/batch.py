"""``explain`` over a dataset: shards, resume, progress and a summary table (issue 17).

- Shards (nnU-Net's convention): ``--num-parts N --part-id I`` explains the cases whose position in the
  input order is I modulo N; under ``torchrun`` (``WORLD_SIZE`` / ``RANK`` set, no ``--num-parts``) each
  rank takes its part, on ``cuda:LOCAL_RANK`` when the device is CUDA. Cases are assigned before any is
  read, so N processes write exactly the case folders of one run.
- Resume: a case whose folder holds a ``provenance.json`` with the same ``resume_key`` (a sha256 of the
  method, the model's sha256, its calibration, every option, the config's explain section, backend, bf16
  and seed) is skipped without being read; ``--overwrite`` redoes it.
- Progress on stderr: a bar (cases, ETA) on a terminal, else a plain ``progress:`` line at most every 30 s.
- A BIDS input also gets its outputs laid out as the derivative dataset ``--out/derivatives/medcfx``
  (:mod:`medcfx.bids_out`).
- ``summary.csv`` and ``summary.json`` in ``--out``: one row per case folder there (built from the
  provenance files, so they include cases written by earlier runs and other parts; rebuilt by every run),
  plus one row per case that failed in this run, with its error. A failed case never stops the others; the
  command exits non-zero at the end (:class:`medcfx.inputs.CaseLog`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from medcfx import staging
from medcfx.errors import UsageError
from medcfx.inputs import CaseLog, InputCase, case_ids, iter_cases

__all__ = ["SUMMARY_COLUMNS", "check_batch_options", "parts_of", "rank_device", "resume_key", "run_explain",
           "write_summary"]

PLAIN_EVERY_S = 30.0
SUMMARY_COLUMNS = ("case", "status", "model", "decision", "image_score", "lesion_size", "unit", "n_components",
                   "self_check_error", "flip_rate", "p_target_before", "p_target_after", "warning", "error")


def parts_of(extra: dict) -> tuple[int, int]:
    """(num_parts, part_id) from ``--num-parts`` / ``--part-id``, else from torchrun's WORLD_SIZE / RANK, else
    (1, 0). UsageError for a part outside 0..N-1."""
    n, i = extra.get("num_parts"), extra.get("part_id")
    if n is None and i is None and os.environ.get("WORLD_SIZE", "").isdigit():
        n, i = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0") or 0)
    n, i = int(n or 1), int(i or 0)
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--part-id must be in 0..{n - 1} for --num-parts {n}, got {i}")
    return n, i


def resume_key(request, entry) -> str:
    """What makes two explain outputs of a case the same: method, model sha256 and calibration, options,
    the explain config, backend, bf16, seed."""
    what = {"method": request.method.name, "model": entry.digest if entry is not None else None,
            "model_ref": request.model,
            "calibration": (entry.extra or {}).get("calibration") if entry is not None else None,
            "options": request.options, "explain": request.config.get("explain"),
            "backend": request.extra.get("backend"), "bf16": bool(request.extra.get("bf16")), "seed": request.seed}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _is_bids(path: Path) -> bool:
    """Whether an input is (part of) a BIDS dataset: its folder, or a parent, holds dataset_description.json."""
    path = path.resolve()
    return any((p / "dataset_description.json").is_file() for p in (path, *path.parents) if p.is_dir())


def _complete(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / "provenance.json").read_text()).get("resume_key") == key
    except (OSError, ValueError):
        return False


def run_explain(request, cfg, channels: int, entry, explain_case: Callable[[InputCase], dict], summary: dict) -> dict:
    """Explain every selected case of ``request.inputs`` with ``explain_case(case) -> dict`` (which writes
    the case folder, recording ``request.extra["resume_key"]`` in its provenance); returns ``summary`` with
    "cases" (this run's results), "skipped" (complete from an earlier run) and the part, or raises
    CaseErrors after writing the summary table when any case failed."""
    n_parts, part = parts_of(request.extra)
    overwrite = bool(request.extra.get("overwrite"))
    key = resume_key(request, entry)
    request.extra["resume_key"] = key
    out = Path(request.out)
    # which cases this process explains, decided before any is read (the same for every part)
    ids = [cid for path in request.inputs for cid in case_ids(path, cfg, channels)]
    mine = [cid for i, cid in enumerate(ids) if i % n_parts == part]
    skipped = [cid for cid in mine if not overwrite and _complete(out / cid, key)]
    todo = set(mine) - set(skipped)

    log, results = CaseLog(), []
    with _progress(request, len(todo)) as advance:
        for path in request.inputs:
            for case in iter_cases(path, cfg, channels, log=request.log, failures=log,
                                   select=lambda cid: cid in todo):
                n = len(case.slice_index)
                with log.case(f"{path} ({case.id})", case.id):
                    results.append(explain_case(case))
                    n = int(results[-1].get("slices", n))  # --slice explains one of them
                advance(case.id, n)
    failed = [str(f) for f in log.failures]
    if out.is_dir():
        write_summary(out, failed)
        bids = [Path(p) for p in request.inputs if _is_bids(Path(p))]
        if bids:
            from medcfx.bids_out import write_derivative

            write_derivative(out, bids)
    summary = {**summary, "cases": results, "skipped": skipped}
    if n_parts > 1:
        summary["part"] = f"{part} of {n_parts}"
    return log.finish(summary)


class _progress:
    """Progress over the cases to explain, on stderr: a rich bar (cases, ETA) on a terminal; otherwise (a
    log file, a cluster job) a plain ``progress:`` line after the first of several cases, whenever
    PLAIN_EVERY_S seconds passed since the last line, and at the end (cases and slices done, elapsed, ETA).
    ``advance(case_id, slices)``."""

    def __init__(self, request, total: int):
        self.total, self.done, self.slices, self.bar, self.said, self.case = total, 0, 0, None, 0, ""
        self.quiet = request.console is None
        self.t0 = self.last = time.monotonic()
        if sys.stderr.isatty() and not self.quiet:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(*Progress.get_default_columns(), "{task.fields[case]}",
                                console=Console(stderr=True), transient=True)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
            task = self.bar.add_task("cases", total=self.total, case="")
            return lambda case_id, slices: self.bar.update(task, advance=1, case=case_id)
        return self._line

    def _line(self, case_id: str, slices: int) -> None:
        self.done, self.slices, self.case = self.done + 1, self.slices + slices, case_id
        now = time.monotonic()
        if not self.quiet and (now - self.last >= PLAIN_EVERY_S or self.done == 1 < self.total):
            self._say(now, case_id)

    def _say(self, now: float, case_id: str) -> None:
        self.last, self.said = now, self.done
        elapsed = now - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"progress: {self.done}/{self.total} cases ({self.slices} slices), last {case_id}, elapsed "
              f"{elapsed:.0f} s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif not self.quiet and self.total > 1 and self.done and self.said != self.done:
            self._say(time.monotonic(), self.case)  # where the run ended
        return False


def _row(folder: Path) -> dict | None:
    try:
        prov = json.loads((folder / "provenance.json").read_text())
    except (OSError, ValueError):
        return None
    d = prov.get("decision") or {}
    size_key = next((k for k in d if k.startswith("lesion_size_")), None)
    check = prov.get("self_check") or {}
    flip = prov.get("flip") or {}  # a classifier-guided method's (cdpm-classifier)
    warning = ""
    if check.get("flagged"):
        warning = f"inversion self-check above {check.get('limit')}"
    return {"case": prov.get("case", folder.name), "status": "ok", "model": prov.get("model") or "",
            "decision": d.get("decision", ""), "image_score": d.get("image_score", prov.get("image_score", "")),
            "lesion_size": d.get(size_key, "") if size_key else "", "unit": size_key[12:] if size_key else "",
            "n_components": d.get("n_components", ""),
            "self_check_error": max(check["mean_abs_error"]) if check.get("mean_abs_error") else "",
            **{k: "" if flip.get(key) is None else flip[key] for k, key in (
                ("flip_rate", "flip_rate"), ("p_target_before", "p_target_before_mean"),
                ("p_target_after", "p_target_after_mean"))},
            "warning": warning, "error": ""}


def write_summary(out: Path, failures: list[str] = ()) -> Path:
    """``summary.csv`` + ``summary.json`` in ``out``: a row per case folder (from its provenance), sorted by
    case, then a row per failure of this run. Written atomically; returns the CSV path."""
    rows = [r for f in sorted(out.iterdir()) if f.is_dir() and not f.name.startswith(".")
            for r in [_row(f)] if r is not None]
    rows.sort(key=lambda r: str(r["case"]))
    rows += [{**dict.fromkeys(SUMMARY_COLUMNS, ""), "case": msg.split(":")[0], "status": "failed", "error": msg}
             for msg in failures]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    staging.atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())
    staging.atomic_write_bytes(out / "summary.json", json.dumps({"cases": rows}, indent=1).encode())
    return out / "summary.csv"


def check_batch_options(method: str, supported: bool, extra: dict) -> None:
    """Refuse --num-parts / --part-id / --overwrite / --report where the command does not run through
    :func:`run_explain` (they would do nothing), and a part outside 0..N-1."""
    given = [flag for flag, key in (("--num-parts", "num_parts"), ("--part-id", "part_id"), ("--overwrite", "overwrite"),
                                    ("--report", "report"))
             if extra.get(key) is not None and extra.get(key) is not False]
    if given and not supported:
        raise UsageError(f"{', '.join(given)}: '{method}' has no shards or resume here (explain of sanchez, its "
                         f"baselines and restoration has)")
    parts_of(extra)


def rank_device(device: str) -> str:
    """Under torchrun (LOCAL_RANK set), ``--device cuda`` / ``auto`` become ``cuda:LOCAL_RANK`` when CUDA is
    available, so each rank explains its part on its own GPU; anything else is returned as given."""
    local = os.environ.get("LOCAL_RANK", "")
    if not local.isdigit() or device not in ("auto", "cuda"):
        return device
    import torch

    return f"cuda:{local}" if torch.cuda.is_available() else device
