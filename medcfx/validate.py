"""Checks of a request made before any work starts and before any file is written.

Each raises :class:`~medcfx.errors.UsageError` with one line naming the option (and path or key) at fault:
output folders that cannot be folders, configuration keys that cannot apply to a trained model, and a
``--seed`` that a deterministic command would ignore.
"""

from __future__ import annotations

import os
from pathlib import Path

from medcfx.errors import MedcfxError, UsageError

__all__ = ["check_fixed_by_model", "check_output_folder", "check_train_request"]

_MISSING = object()


def check_output_folder(path: str | Path, option: str, inputs=()) -> Path:
    """Refuse ``path`` as a folder to write into (given as ``option``, e.g. ``--out``) when it cannot become
    one: it is an existing file, a path under a file, or its nearest existing ancestor is not writable; or
    when it is one of ``inputs`` or contains one (a case folder written there could replace the input it was
    made from: ``explain brats/ --out brats/``), or lies inside an input folder (the next run would read it as
    a case), except under a BIDS dataset's ``derivatives/``. Nothing is created. Returns ``path``."""
    path = Path(path)
    here = path.resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if src == here or here in src.parents:
            raise UsageError(f"{option} {path}: it {'is' if src == here else 'contains'} the input {given}; "
                             f"write the outputs to a folder outside the data")
        if src.is_dir() and src in here.parents and not _in_bids_derivatives(src, here):
            raise UsageError(f"{option} {path}: it lies inside the input {given}, whose layout it would change "
                             f"(the next run would read it as a case); write the outputs outside the data "
                             f"(in a BIDS dataset: under its derivatives/)")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: a file exists there; give a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{option} {path}: {probe} is a file, so no folder can be created under it")
    if probe.is_dir() and probe != path and not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot create it, {probe} is not writable")
    if probe == path and not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder is not writable")
    return path


def _in_bids_derivatives(src: Path, out: Path) -> bool:
    """Whether ``out`` lies under the ``derivatives/`` folder of the BIDS dataset ``src`` (or of the BIDS
    dataset ``src`` belongs to), which BIDS readers never take for subjects."""
    for root in (src, *src.parents):
        if (root / "dataset_description.json").is_file():
            return (root / "derivatives") in (out, *out.parents)
    return False


def check_train_request(config: dict, name: str | None, runs_dir: str | Path) -> None:
    """Everything ``medcfx train`` can check before it reads data or creates a run folder: the ``--name``
    (the registry's naming rule), ``--runs-dir`` (a folder can be created there) and the ``train:``
    section of the resolved config (sizes and intervals in range, see ``TrainConfig.from_dict``)."""
    if name is not None:
        from medcfx.registry import validate_name

        try:
            validate_name(name)
        except MedcfxError as exc:
            raise UsageError(f"--name: {exc}") from None
    check_output_folder(runs_dir, "--runs-dir")
    if isinstance(config.get("train"), dict):
        from medcfx.train import TrainConfig

        TrainConfig.from_dict(config["train"])


def check_fixed_by_model(layers: list[dict], registry, model: str | None, section: str = "preprocess") -> None:
    """Refuse values the user gave (``-c`` / ``--set``; ``layers`` as parsed) for keys of ``section`` that a
    trained model fixes: preprocessing is replayed from the model's registry entry at explain, grade,
    evaluate, predict and sample, so an override would silently do nothing.

    A value equal to the model's is accepted. ``model``: the ``--model`` reference (for an ensemble
    ``a,b``, the first member, whose preprocessing every member shares); its entry, or the entry's parent
    for an entry that records none (a grader and its autoencoder), gives the value named in the error.
    Without ``--model`` (the method picks its default model) any value is refused.
    """
    given = {}
    for layer in layers:
        if isinstance(layer.get(section), dict):
            given.update(layer[section])
    if not given:
        return
    fixed, ref = None, None
    if model:
        entry = registry.resolve(model.split(",")[0].strip())
        ref, fixed = entry.ref, entry.config.get(section)
        if not isinstance(fixed, dict) and entry.parent:
            parent = registry.resolve(entry.parent)
            ref, fixed = parent.ref, parent.config.get(section)
    what = "preprocessing" if section == "preprocess" else f"'{section}'"
    for key, value in given.items():
        if fixed is None:
            raise UsageError(f"{section}.{key}: {what} is fixed by the model this command loads; remove the override")
        have = fixed.get(key, _MISSING)
        if have is _MISSING:
            raise UsageError(f"{section}.{key}={value!r} cannot apply: {what} is fixed by the model and {ref} "
                             f"records no {section}.{key}")
        if value != have:
            raise UsageError(f"{section}.{key}={value!r} cannot apply: {what} is fixed by the model ({ref} was "
                             f"trained with {section}.{key}={have!r})")
