"""The staging rule: atomic writes keep modes, and sweep removes exactly the temporaries of dead writers."""

import os
import stat
import subprocess
import sys

import pytest

from medcfx import staging


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid (pids are not reused this fast)


def test_atomic_write_keeps_existing_mode_and_uses_umask_for_new(tmp_path):
    old = os.umask(0o002)
    try:
        new = tmp_path / "new.yaml"
        staging.atomic_write_bytes(new, b"a")
        assert stat.S_IMODE(new.stat().st_mode) == 0o664  # 0o666 & ~0o002, not mkstemp's 0600
        shared = tmp_path / "shared.yaml"
        shared.write_bytes(b"x")
        os.chmod(shared, 0o640)
        staging.atomic_write_bytes(shared, b"y")
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640 and shared.read_bytes() == b"y"
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.yaml", "shared.yaml"]


def test_failed_staged_writes_leave_nothing(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"before")
    with pytest.raises(RuntimeError):
        with staging.staged_file(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    with pytest.raises(KeyboardInterrupt):
        with staging.staged_folder(tmp_path / "case") as folder:
            (folder / "heatmap.nii.gz").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"] and dest.read_bytes() == b"before"


def test_staged_folder_replaces_existing(tmp_path):
    final = tmp_path / "case"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staging.staged_folder(final) as folder:
        (folder / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["case"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def test_sweep_removes_dead_writers_only(tmp_path):
    host = staging._host_tag()
    other = "0" * 8 if host != "0" * 8 else "1" * 8
    dead = _dead_pid()
    mine = staging.staging_path(tmp_path / "a.yaml")  # this (running) process
    mine.write_text("in progress")
    dead_file = tmp_path / f"{staging.PREFIX}{dead}-{host}-deadbeef-registry.yaml"
    dead_file.write_text("killed")
    dead_dir = tmp_path / f"{staging.PREFIX}{dead}-{host}-deadbeef-case_001"
    (dead_dir / "sub").mkdir(parents=True)
    foreign_new = tmp_path / f"{staging.PREFIX}{dead}-{other}-0badf00d-x"
    foreign_new.write_text("another host, just now")
    foreign_old = tmp_path / f"{staging.PREFIX}{dead}-{other}-0badf00e-y"
    foreign_old.write_text("another host, long ago")
    two_days = foreign_old.stat().st_mtime - 2 * 24 * 3600
    os.utime(foreign_old, (two_days, two_days))
    user = tmp_path / ".medcfx-tmp-notours"  # does not match the rule: never touched
    user.write_text("keep")
    removed = staging.sweep(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead_file.name, dead_dir.name, foreign_old.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, foreign_new.name, user.name])
    assert staging.sweep(tmp_path / "missing") == []
