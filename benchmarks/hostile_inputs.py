"""Bad inputs through the real CLI, as a careless user and an attacker would give them.

Each case runs ``medcfx`` in a subprocess (own MEDCFX_HOME, own temp directory) and is *clean* when

* the exit status is non-zero (medcfx uses 1 for bad input, 2 for a bad option, 3 for a failed integrity
  check; a case may name the one it expects),
* stderr is exactly one line besides notes (``using <model>``, ``--out not given: ...``), with no "internal
  error" and no traceback,
* nothing was left behind: no path the case names as forbidden exists, no staging temporary
  (``.medcfx-tmp-*``) is anywhere under the work folder or in the temp directory, and the temp directory
  holds nothing new.

Usage::

    python benchmarks/hostile_inputs.py [--only SUBSTRING] [--keep]

prints one line per case and ``clean N/TOTAL``; exits 1 unless every case is clean.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_CASE = REPO / "models" / "demo-inputs" / "brain" / "demo_case"
FAST = ["--steps", "4", "--slice", "6"]  # explain settings that keep a passing call short


# stderr lines that are notes, not errors: which model a command picked, where it writes
NOTES = ("using ", "--out not given: ", "note: ", "progress: ")


@dataclass
class Case:
    name: str
    argv: list[str]
    code: int | None = None  # None: any non-zero status
    absent: list[str] = field(default_factory=list)  # paths (relative to the work folder) that must not exist
    env: dict[str, str] = field(default_factory=dict)
    stdout_has: str = ""


def _setup(work: Path) -> None:
    """The files the cases point at."""
    (work / "afile.txt").write_text("I am a file, not a folder\n")
    shutil.copytree(DEMO_CASE, work / "brain" / "demo_case")
    (work / "empty").mkdir()
    (work / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(300))
    (work / "junk.tar").write_bytes(os.urandom(2048))
    (work / "notyaml.yaml").write_text("a: [1, 2\n")
    (work / "notimage.png").write_text("not a png")
    # a case whose files do not share one grid (the label is a different shape)
    bad = work / "badgrid" / "case_1"
    bad.mkdir(parents=True)
    import nibabel as nib
    import numpy as np

    img = nib.load(str(next(DEMO_CASE.glob("*flair*"))))
    for path in DEMO_CASE.iterdir():
        shutil.copy(path, bad / path.name.replace("demo_case", "case_1"))
    seg = next(bad.glob("*seg*"))
    nib.save(nib.Nifti1Image(np.zeros((9, 9, 9), np.uint8), img.affine), str(seg))
    corrupt = work / "corruptcase" / "case_1"
    corrupt.mkdir(parents=True)
    for path in DEMO_CASE.iterdir():
        shutil.copy(path, corrupt / path.name.replace("demo_case", "case_1"))
    flair = next(corrupt.glob("*flair*"))
    flair.write_bytes(flair.read_bytes()[:2000])  # truncated gzip stream
    # archives: a '..' member, and a member much larger than entry.yaml records
    body = yaml.safe_dump({"name": "m", "version": 1, "method": "sanchez", "created": "x",
                           "artifacts": {"weights": {"path": "artifacts/weights.safetensors",
                                                     "sha256": "0" * 64, "bytes": 10}}}).encode()
    for name, member, size in (("dotdot.tar", "../evil", 10), ("bomb.tar", "artifacts/weights.safetensors", 4 << 20)):
        with tarfile.open(work / name, "w") as tar:
            info = tarfile.TarInfo("entry.yaml")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
            info = tarfile.TarInfo(member)
            info.size = size
            tar.addfile(info, io.BytesIO(b"\0" * size))
    # a bundled catalogue pointing outside its folder (at a file with the right hash), and one not YAML
    secret = work / "secret.bin"
    secret.write_bytes(b"secret")
    import hashlib

    cat = work / "catalogue"
    cat.mkdir()
    (cat / "registry.yaml").write_text(yaml.safe_dump({"schema": 1, "models": [{
        "name": "evil", "version": 1, "method": "sanchez", "created": "x",
        "artifacts": {"weights": {"path": "../secret.bin", "sha256": hashlib.sha256(b"secret").hexdigest(),
                                  "bytes": 6}}}]}))
    (cat / "broken.yaml").write_text("models: [\n")


def _cases() -> list[Case]:
    ex = ["explain", "brain/demo_case", "--model", "sanchez-demo"]
    tr = ["train", "sanchez", "--data", "brain", "--preset", "demo", "--runs-dir", "runs"]
    return [
        # outputs that cannot be written
        Case("explain --out is a file", [*ex, "--out", "afile.txt", *FAST]),
        Case("explain --out under a file", [*ex, "--out", "afile.txt/sub", *FAST]),
        Case("explain --out is the data folder", ["explain", "brain", "--method", "threshold", "--out", "brain"]),
        Case("data prepare --cache under a file", ["data", "prepare", "brain", "--cache", "afile.txt/c"]),
        Case("train --runs-dir under a file", [*tr[:6], "--runs-dir", "afile.txt/runs"]),
        Case("models export into a missing folder", ["models", "export", "sanchez-demo", "nofolder/m.tar"]),
        Case("models export with a wrong suffix", ["models", "export", "sanchez-demo", "m.zip"], absent=["m.zip"]),
        # config values of the wrong type or range
        Case("--set explain.steps=abc", [*ex, "--set", "explain.steps=abc", "--out", "o"], absent=["o"]),
        Case("--set explain.guidance=[1,2]", [*ex, "--set", "explain.guidance=[1,2]", "--out", "o"], absent=["o"]),
        Case("--set train.steps=abc", [*tr, "--set", "train.steps=abc"], absent=["runs"]),
        Case("--set train=5", [*tr, "--set", "train=5"], absent=["runs"]),
        Case("--set train.lr=fast", [*tr, "--set", "train.lr=fast"], absent=["runs"]),
        Case("--set of an unknown key", [*ex, "--set", "explain.stepz=4", "--out", "o"], absent=["o"]),
        Case("--guidance nan", [*ex, "--guidance", "nan", "--out", "o", *FAST], absent=["o"]),
        Case("--guidance inf", [*ex, "--guidance", "inf", "--out", "o", *FAST], absent=["o"]),
        Case("--noise-level 5", [*ex, "--noise-level", "5", "--out", "o", *FAST], absent=["o"]),
        Case("--steps 0", [*ex, "--steps", "0", "--slice", "6", "--out", "o"], absent=["o"]),
        Case("--set preprocess.size=96 on a 48 px model", [*ex, "--set", "preprocess.size=96", "--out", "o", *FAST],
             absent=["o"]),
        Case("-c file that is not YAML", [*ex, "-c", "notyaml.yaml", "--out", "o"], absent=["o"]),
        # training requests refused before a run folder exists
        Case("train.steps=-5", [*tr, "--set", "train.steps=-5"], absent=["runs"]),
        Case("train.batch_size=0", [*tr, "--set", "train.batch_size=0"], absent=["runs"]),
        Case("train --name ../evil", [*tr, "--name", "../evil", "--set", "train.steps=1"], absent=["runs"]),
        Case("train an unknown method", ["train", "nosuch", "--data", "brain", "--runs-dir", "runs"], absent=["runs"]),
        # inputs that are not what they seem
        Case("explain a corrupt NIfTI", ["explain", "corrupt.nii.gz", "--model", "sanchez-demo", "--out", "o"],
             absent=["o"]),
        Case("explain a case with a corrupt file", ["explain", "corruptcase/case_1", "--model", "sanchez-demo",
                                                    "--out", "o"], absent=["o"]),
        Case("explain a missing input", ["explain", "nothere.nii.gz", "--model", "sanchez-demo", "--out", "o"],
             absent=["o"]),
        Case("explain an empty folder", ["explain", "empty", "--model", "sanchez-demo", "--out", "o"], absent=["o"]),
        Case("explain files on different grids", ["explain", "badgrid/case_1", "--model", "sanchez-demo", "--out", "o"],
             absent=["o"]),
        Case("grade a file that is not an image", ["grade", "notimage.png", "--out", "o"], absent=["o"]),
        Case("data check of a missing path", ["data", "check", "nothere"]),
        # models and backends that cannot be used
        Case("explain --model unknown", [*ex[:2], "--model", "nosuch", "--out", "o"], absent=["o"]),
        Case("explain --model sha256:zz", [*ex[:2], "--model", "sha256:zz", "--out", "o"], absent=["o"]),
        Case("explain --method nosuch", [*ex[:2], "--method", "nosuch", "--out", "o"], absent=["o"]),
        Case("--backend onnx without an export", [*ex, "--backend", "onnx", "--out", "o"], absent=["o"]),
        Case("--device cuda without a GPU", [*ex, "--device", "cuda", "--out", "o"], absent=["o"]),
        Case("--seed on a deterministic sampler", [*ex, "--seed", "3", "--out", "o", *FAST], absent=["o"]),
        # the registry
        Case("models import of a file that is not an archive", ["models", "import", "junk.tar"]),
        Case("models import of a missing file", ["models", "import", "nothere.tar"]),
        Case("models import of an archive with '..'", ["models", "import", "dotdot.tar"]),
        Case("models import of an expanding member", ["models", "import", "bomb.tar"]),
        Case("models show unknown", ["models", "show", "nosuch"]),
        Case("models rm of a bundled model", ["models", "rm", "sanchez-demo", "--yes"]),
        Case("MEDCFX_HOME is a file", ["models", "list"], env={"MEDCFX_HOME": "afile.txt"}),
        Case("bundled catalogue path outside its folder", ["models", "verify"], code=3,
             env={"MEDCFX_BUNDLED_REGISTRY": "catalogue/registry.yaml"}, stdout_has="FAIL evil:1"),
        Case("bundled catalogue export of an outside path", ["models", "export", "evil", "evil.tar"],
             env={"MEDCFX_BUNDLED_REGISTRY": "catalogue/registry.yaml"}, absent=["evil.tar"]),
        Case("bundled catalogue that is not YAML", ["models", "list"],
             env={"MEDCFX_BUNDLED_REGISTRY": "catalogue/broken.yaml"}),
    ]


def _staging_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".medcfx-tmp-*")]


def run_case(case: Case, work: Path, home: Path, tmpdir: Path) -> tuple[bool, str]:
    env = dict(os.environ, MEDCFX_HOME=str(home), MEDCFX_CACHE=str(work / "cache"), TMPDIR=str(tmpdir),
               COLUMNS="200", NO_COLOR="1")
    env.update({k: str(work / v) for k, v in case.env.items()})  # the values are paths in the work folder
    exe = Path(sys.executable).parent / "medcfx"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "medcfx"]
    before = set(tmpdir.iterdir())
    proc = subprocess.run(cmd + case.argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    problems = []
    if proc.returncode == 0 or (case.code is not None and proc.returncode != case.code):
        problems.append(f"exit {proc.returncode} (expected {case.code or 'non-zero'})")
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(NOTES)]
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines besides notes")
    if "internal error" in proc.stderr.lower() or "Traceback" in proc.stderr:
        problems.append("internal error")
    if case.stdout_has and case.stdout_has not in proc.stdout:
        problems.append(f"stdout lacks {case.stdout_has!r}")
    for rel in case.absent:
        if (work / rel).exists():
            problems.append(f"left {rel}")
    if leftovers := _staging_leftovers(work) + _staging_leftovers(home):
        problems.append(f"left {leftovers[0].name}")
    if new := set(tmpdir.iterdir()) - before:
        problems.append(f"left {sorted(new)[0].name} in the temp directory")
    for rel in case.absent:  # reset for the next case
        target = work / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    message = f"[{proc.returncode}] " + (lines[0][:140] if lines else "")
    return not problems, "; ".join(problems) or message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    work, home, tmpdir = root / "work", root / "home", root / "tmp"
    work.mkdir()
    home.mkdir()
    tmpdir.mkdir()
    _setup(work)
    cases = [c for c in _cases() if args.only in c.name]
    clean = 0
    try:
        for case in cases:
            ok, detail = run_case(case, work, home, tmpdir)
            clean += ok
            print(f"{'clean' if ok else 'DIRTY'}  {case.name:48s} {detail}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"clean {clean}/{len(cases)}")
    return 0 if clean == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
