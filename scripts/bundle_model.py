#!/usr/bin/env python
"""Copy a registered model into the repository as a bundled model (developers only).

    python scripts/bundle_model.py REF NAME [--version 1]

Copies every artifact of REF (verified) to models/<NAME>.<role><suffix>, and adds or replaces the entry
NAME:VERSION in the top-level registry.yaml with paths relative to it, sha256 and sizes. Other versions of
NAME that used the same files are dropped from registry.yaml (their files were just overwritten). Safe to run from
several processes at once (file lock on registry.yaml.lock).
"""

import argparse
import fcntl
import os
import shutil
from pathlib import Path

import yaml

from medcfx.registry import Registry, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("name")
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--parent", default=None, help="bundled parent ref, e.g. diffae-demo:1")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository whose models/ and registry.yaml to write")
    args = ap.parse_args()
    root = args.root.resolve()
    reg = Registry()
    entry = reg.resolve(args.ref)
    (root / "models").mkdir(exist_ok=True)
    artifacts = {}
    for role, art in entry.artifacts.items():
        src = reg.artifact_path(entry, role)
        dst = root / "models" / f"{args.name}.{role}{''.join(Path(art['path']).suffixes[-1:])}"
        shutil.copyfile(src, dst)
        artifacts[role] = {"path": str(dst.relative_to(root)), "sha256": sha256_file(dst), "bytes": dst.stat().st_size}
    item = entry.to_dict()
    item.update(name=args.name, version=args.version, artifacts=artifacts)
    if args.parent:
        item["parent"] = args.parent
    catalogue = root / "registry.yaml"
    with open(root / "registry.yaml.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = yaml.safe_load(catalogue.read_text()) if catalogue.exists() else None
        data = data or {"schema": 1, "models": []}
        # an older version of NAME points at the files just overwritten: its sha256 no longer holds, so it goes
        paths = {a["path"] for a in artifacts.values()}
        data["models"] = [m for m in data.get("models", []) if (m["name"], m["version"]) != (args.name, args.version)
                          and not paths & {a["path"] for a in m.get("artifacts", {}).values()}]
        data["models"].append(item)
        data["models"].sort(key=lambda m: (m["name"], m["version"]))
        tmp = catalogue.with_suffix(".tmp")
        tmp.write_text("# Bundled models (read-only; merged into `medcfx models list`). Written by scripts/bundle_model.py.\n"
                       + yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, catalogue)
    print(f"bundled {entry.ref} as {args.name}:{args.version} ({sum(a['bytes'] for a in artifacts.values())} bytes)")


if __name__ == "__main__":
    main()
