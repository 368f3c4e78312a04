"""The parts of the benchmark scripts that decide which numbers a table shows: operating_points.py's reuse of an
earlier row, sanchez_demo.py's cells over seeds."""

import importlib.util
import json
import sys

import numpy as np

from conftest import ROOT


def _load(name: str = "operating_points"):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_an_earlier_row_is_reused_only_for_the_same_model_version_and_slices(tmp_path):
    """A re-bundled model (restoration-demo:1 -> :2) must be evaluated again, not shown with the old model's
    numbers under the new name."""
    op = _load()
    out = tmp_path / "eval-restoration"
    assert op.earlier_row(out, "restoration-demo:2", 12) == (None, None)  # nothing there yet
    out.mkdir()
    rep = {"model": "restoration-demo:1", "max_slices": 12, "metrics": {"pixel_AUPRC": 0.117}}
    (out / "metrics.json").write_text(json.dumps(rep))
    (out / "row.json").write_text(json.dumps({"model": "restoration-demo:1", "max_slices": 12, "minutes": 0.7}))
    assert op.earlier_row(out, "restoration-demo:1", 12) == (rep, 0.7)
    assert op.earlier_row(out, "restoration-demo:2", 12) == (None, None)  # re-bundled: evaluate again
    assert op.earlier_row(out, "restoration-demo:1", 24) == (None, None)  # other slices
    (out / "row.json").write_text(json.dumps({"model": "restoration-demo:2", "max_slices": 12, "minutes": 0.7}))
    assert op.earlier_row(out, "restoration-demo:2", 12) == (None, None)  # the report itself is of :1
    (out / "metrics.json").write_text("{")  # a half-written report is not a result
    assert op.earlier_row(out, "restoration-demo:2", 12) == (None, None)
    thr = tmp_path / "eval-threshold"  # a row without a model (the report says '-')
    thr.mkdir()
    (thr / "metrics.json").write_text(json.dumps({"model": "-", "max_slices": 12}))
    (thr / "row.json").write_text(json.dumps({"model": None, "max_slices": 12, "minutes": 0.3}))
    assert op.earlier_row(thr, None, 12)[1] == 0.3


def test_sanchez_table_cells_are_the_mean_and_sd_over_seeds_or_one_seeds_interval():
    sd = _load("sanchez_demo")

    def row(v, lo=None, hi=None):
        return {"metrics": {"pixel_AUPRC": v}, "intervals": {"pixel_AUPRC": {"ci_low": lo, "ci_high": hi}}}

    assert sd.pct_cell([row(0.699, 0.56, 0.843)], "pixel_AUPRC") == "69.9 [56.0, 84.3]"
    assert sd.pct_cell([row(0.699)], "pixel_AUPRC") == "69.9"
    v = np.array([0.699, 0.61, 0.655])
    want = f"{100 * v.mean():.1f} +- {100 * v.std(ddof=1):.1f}"
    assert sd.pct_cell([row(x, 0.1, 0.9) for x in v], "pixel_AUPRC") == want  # intervals of one seed not mixed in
    assert sd.pct_cell([row(0.5), row(float("nan")), row(0.7)], "pixel_AUPRC") == "60.0 +- 14.1 (2 of 3 seeds)"
    assert sd.pct_cell([row(float("nan")), row(None)], "pixel_AUPRC") == "n/a"
