"""benchmarks/operating_points.py reads a row back only when the earlier run scored the same model version on
the same slices: a re-bundled model (restoration-demo:1 -> :2) must be evaluated again, not shown with the old
model's numbers under the new name."""

import importlib.util
import json
import sys

from conftest import ROOT


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("operating_points", ROOT / "benchmarks" / "operating_points.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_an_earlier_row_is_reused_only_for_the_same_model_version_and_slices(tmp_path):
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
