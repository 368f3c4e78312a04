"""The line a training run prints before its long part: preset, network size and an estimate of the time.

``fit`` (:mod:`medcfx.train`) times the :data:`PROBE_STEPS` optimizer steps after the first (which warms
up: allocations, autotuning), then prints :func:`announce`'s line, e.g. (the paper network of sanchez; an
illustrative speed)::

    train: no --preset (the method's defaults); network 27,193,860 parameters (27.19M); 50000 steps of batch
    64 on cpu; 11.75 s/step over 5 timed step(s) -> about 163 h 11 min for the 49994 steps left (ends
    around 14:02)

so a run that would take days on a laptop says so within a minute, not after it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

PROBE_STEPS = 5


def say(text: str, log, bar) -> None:
    """Print ``text`` through ``log`` if given, else above the rich progress ``bar``, else on stderr."""
    if log is not None:
        log(text)
    elif bar is not None:
        bar.console.print(text, markup=False, highlight=False)
    else:
        print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """3725 -> '1 h 02 min'; 95 -> '1 min 35 s'; 4.2 -> '4 s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{max(s, 1) if seconds > 0 else 0} s"


def run_preset(run: Path | None) -> tuple[bool, str | None]:
    """(known, preset) from a run folder's config.yaml written by :func:`medcfx.train.start_run`; (False, None) when the
    folder has no such record (a loop called directly, a classifier's sub-run)."""
    if run is None or not (Path(run) / "config.yaml").is_file():
        return False, None
    import yaml

    try:
        record = yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False, None
    if not isinstance(record, dict) or "preset" not in record:
        return False, None
    return True, record["preset"]


def announce(model, cfg, run: Path | None, step: int, rate: float, timed: int, device: str) -> str:
    """The line ``fit`` prints once the first steps are timed: preset, parameter count (every parameter of
    ``model``), the run's length and the estimated time for the steps left at ``rate`` steps/s."""
    params = sum(p.numel() for p in model.parameters())
    known, preset = run_preset(run)
    parts = ["train:"]
    if known:
        parts.append(f"preset {preset};" if preset else "no --preset (the method's defaults);")
    left = cfg.steps - step
    speed = f"{rate:,.2f} steps/s" if rate >= 1 else f"{1 / rate:,.2f} s/step"
    parts.append(f"network {params:,} parameters ({params / 1e6:.2f}M); {cfg.steps} steps of batch {cfg.batch_size} "
                 f"on {device}; {speed} over {timed} timed step(s)")
    if left > 0:
        finish = time.strftime("%H:%M", time.localtime(time.time() + left / rate))
        parts.append(f"-> about {_duration(left / rate)} for the {left} steps left (ends around {finish})")
    return " ".join(parts)


PLAIN_EVERY_S = 30.0


class PlainProgress:
    """Training progress for a log file or a cluster job (stdout not a terminal, where a rich bar shows only
    its last state): one ``progress:`` line on stderr at the first step and then whenever ``every_s``
    seconds passed: step/total, loss, steps/s over the interval, ETA."""

    def __init__(self, total: int, start: int, every_s: float = PLAIN_EVERY_S):
        self.total, self.every_s = total, every_s
        self.t_last, self.step_last, self.t0, self.start = time.monotonic(), start, time.monotonic(), start

    def tick(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if step != self.start + 1 and now - self.t_last < self.every_s and step != self.total:
            return
        rate = (step - self.step_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        eta = _duration((self.total - step) / rate) if rate > 0 else "unknown"
        print(f"progress: step {step}/{self.total}, loss {loss:.4f}, {rate:.2f} steps/s, ETA {eta}",
              file=sys.stderr, flush=True)
