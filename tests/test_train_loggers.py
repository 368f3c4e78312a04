"""train --logger tensorboard|mlflow: the real packages write into the run folder; the values read back with
their own readers equal metrics.jsonl's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli_env, run_cli


def _train(home, toy_site, tmp_path, logger):
    np.save(tmp_path / "toyset.npy", np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    env = cli_env(home, toy_site)
    run_cli(["train", "toy", "--data", "toyset.npy", "--runs-dir", "runs", "--device", "cpu", "--logger", logger,
             "--set", "train.steps=6", "--set", "train.log_every=2"], env=env, cwd=tmp_path, check=0)
    run = tmp_path / "runs" / "toy" / "toyset" / "v1"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return run, [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_tensorboard_events_hold_the_logged_losses(home, toy_site, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, expected = _train(home, toy_site, tmp_path, "tensorboard")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in got] == [2, 4, 6] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)  # stored as float32


def test_mlflow_file_store_holds_the_logged_losses_and_config(home, toy_site, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reader opts in to the file store as medcfx does
    import mlflow

    run, expected = _train(home, toy_site, tmp_path, "mlflow")
    client = mlflow.tracking.MlflowClient((run / "mlruns").absolute().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "medcfx"]
    (r,) = client.search_runs([exp.experiment_id])
    got = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")]
    assert sorted(got) == expected
    assert r.data.params["train.steps"] == "6"


def test_unknown_logger_is_refused_before_the_run_folder(home, toy_site, tmp_path):
    env = cli_env(home, toy_site)
    np.save(tmp_path / "toyset.npy", np.zeros((4, 1, 8, 8), np.float32))
    p = run_cli(["train", "toy", "--data", "toyset.npy", "--runs-dir", "runs", "--logger", "wandb"], env=env,
                cwd=tmp_path)
    assert p.returncode == 2 and "--logger must be one of tensorboard, mlflow" in p.stderr
    assert not (tmp_path / "runs").exists()
