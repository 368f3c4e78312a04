"""The training loop: determinism, checkpoints, resume after SIGKILL, DDP equivalence, registration."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, run_cli
from medcfx.train import (Batch, TrainConfig, balanced_batches, ema_update, fit, load_checkpoint,
                          save_checkpoint, uniform_batches)


# ------------------------------------------------------------------ unit level


def test_per_sample_draws_depend_only_on_seed_step_and_position():
    a = Batch(step=3, seed=7, indices=torch.tensor([5, 9, 2, 4]), positions=torch.arange(4))
    b = Batch(step=3, seed=7, indices=torch.tensor([2, 4]), positions=torch.tensor([2, 3]))  # rank 1 of 2
    assert torch.equal(a.randn(2, 3)[2:], b.randn(2, 3))
    assert torch.equal(a.randint(1000)[2:], b.randint(1000))
    c = Batch(step=4, seed=7, indices=torch.tensor([2, 4]), positions=torch.tensor([2, 3]))
    assert not torch.equal(b.randn(2, 3), c.randn(2, 3))


def test_balanced_batches_draw_classes_equally_from_imbalanced_labels():
    labels = np.array([0] * 950 + [1] * 50)
    draw = balanced_batches(labels)
    idx = torch.cat([draw(0, s, 64) for s in range(100)])
    frac = float((torch.as_tensor(labels)[idx] == 1).float().mean())
    # 6400 Bernoulli(0.5) draws: std 0.00625, so 5 sigma is 0.03
    assert abs(frac - 0.5) < 0.03
    assert len(set(idx[torch.as_tensor(labels)[idx] == 1].tolist())) > 40  # the minority class is covered
    assert torch.equal(draw(0, 5, 16), draw(0, 5, 16)) and not torch.equal(draw(0, 5, 16), draw(0, 6, 16))


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    m, e = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * pe.detach() + 0.1 * pm.detach() for pe, pm in zip(e.parameters(), m.parameters())]
    ema_update(e, m, 0.9)
    for got, want in zip(e.parameters(), expected):
        torch.testing.assert_close(got, want)


def _quadratic_problem():
    torch.manual_seed(0)
    target = torch.randn(64, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4))

    def loss_fn(net, batch):
        x = batch.randn(4)
        return (net(x) - target[batch.indices]).pow(2).mean(), {}

    return model, loss_fn, uniform_batches(64)


def test_checkpoint_round_trip_restores_exact_optimizer_and_rng(tmp_path):
    model, loss_fn, draw = _quadratic_problem()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, ema_decay=0.5, ckpt_every=3, log_every=1)
    (tmp_path / "a").mkdir()
    full = fit(model, loss_fn, draw, cfg, tmp_path / "a", progress=False)
    # a second run stopped at step 3, then resumed from its checkpoint, matches step by step
    model2, loss_fn2, _ = _quadratic_problem()
    (tmp_path / "b").mkdir()
    fit(model2, loss_fn2, draw, TrainConfig(**{**cfg.__dict__, "steps": 3}), tmp_path / "b", progress=False)
    model3, loss_fn3, _ = _quadratic_problem()
    resumed = fit(model3, loss_fn3, draw, cfg, tmp_path / "b", resume=True, progress=False)
    assert [s for s, _ in resumed.losses] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in resumed.losses], [v for _, v in full.losses], rtol=0, atol=1e-6)
    for p, q in zip(full.ema.parameters(), resumed.ema.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_checkpoints_are_complete_or_absent(tmp_path):
    model, _, _ = _quadratic_problem()
    ema = torch.nn.Sequential(*[torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, ema, opt, {"k": step})
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert (ck / "latest").resolve().name == "step-00000003"
    opt2 = torch.optim.AdamW(model.parameters())
    state = load_checkpoint((ck / "latest").resolve(), model, ema, opt2)
    assert state["step"] == 3 and state["k"] == 3
    for a, b in zip(opt.state.values(), opt2.state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)


def test_warmup_and_param_groups(tmp_path):
    model, loss_fn, draw = _quadratic_problem()
    seen = []

    def spy(net, batch):
        seen.append([g["lr"] for g in opt_groups])
        return loss_fn(net, batch)

    head = list(model[2].parameters())
    groups = [{"params": list(model[0].parameters())}, {"params": head, "lr": 1.0}]
    opt_groups = groups
    fit(model, spy, draw, TrainConfig(steps=4, batch_size=4, lr=0.1, warmup_steps=4, log_every=1), tmp_path,
        param_groups=groups, progress=False)
    np.testing.assert_allclose(seen, [[0.025, 0.25], [0.05, 0.5], [0.075, 0.75], [0.1, 1.0]])


def test_divergence_is_a_clear_error(tmp_path):
    from medcfx.errors import MedcfxError

    model = torch.nn.Linear(2, 2)
    with pytest.raises(MedcfxError, match="diverged at step 0"):
        fit(model, lambda net, b: (net(b.randn(2)).sum() * float("nan"), {}), uniform_batches(4),
            TrainConfig(steps=2, batch_size=2), tmp_path, progress=False)


# ------------------------------------------------------------------ end to end through the CLI (toy plugin)


@pytest.fixture
def toy_data(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:8, 0:8]
    imgs = np.stack([np.sin(xx * f + p) * np.cos(yy * f) for f, p in rng.uniform(0.2, 1.0, (32, 2))])[:, None]
    path = tmp_path / "toyset.npy"
    np.save(path, imgs.astype(np.float32))
    return path


def test_toy_method_trains_registers_verifies_loads_and_samples(home, toy_site, toy_data, tmp_path):
    env = cli_env(home, toy_site)
    runs = tmp_path / "runs"
    proc = run_cli(["train", "toy", "--data", toy_data, "--runs-dir", runs, "--device", "cpu", "--seed", "3",
                    "--set", "train.steps=6"], env=env, check=0)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["model"] == "toy:1"
    run = Path(out["run"])
    assert run == (runs / "toy" / "toyset" / "latest").resolve() and run.name == "v1"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "progress.png", "model.safetensors"):
        assert (run / name).is_file(), name
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6

    listing = json.loads(run_cli(["models", "list", "--json"], env=env, check=0).stdout)
    entry = next(e for e in listing if e["name"] == "toy")
    assert entry["method"] == "toy" and entry["version"] == 1
    run_cli(["models", "verify", "toy"], env=env, check=0)

    samples = tmp_path / "samples"
    run_cli(["sample", "--method", "toy", "--model", "toy:1", "-n", "2", "--out", samples, "--seed", "5",
             "--steps", "ddim5", "--device", "cpu"], env=env, check=0)
    got = np.load(samples / "samples.npy")
    # independent reproduction in this process from the run folder's own weights file
    from medcfx.diffusion import Schedule, TorchDenoiser, sample
    from medcfx.nn import UNet
    from medcfx_toy import NETWORK  # noqa: F401  (importable because toy_site is on sys.path below)

    model = UNet.from_config(NETWORK)
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    x = sample(TorchDenoiser(model.eval()), (2, 1, 8, 8), Schedule.create("linear", 100).respace("ddim5"),
               generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(got, x.numpy(), atol=1e-5)

    # a second training run gets version 2 and a new run folder
    proc = run_cli(["train", "toy", "--data", toy_data, "--runs-dir", runs, "--device", "cpu", "--set", "train.steps=2"],
                   env=env, check=0)
    assert '"model": "toy:2"' in proc.stdout
    assert (runs / "toy" / "toyset" / "latest").resolve().name == "v2"


@pytest.fixture(autouse=True)
def _toy_on_path(toy_site, monkeypatch):
    monkeypatch.syspath_prepend(str(toy_site))


def test_sigkill_then_resume_continues_the_same_trajectory(home, toy_site, toy_data, tmp_path):
    env = cli_env(home, toy_site)
    common = ["--data", toy_data, "--device", "cpu", "--seed", "1", "--set", "train.steps=14", "--set", "train.ckpt_every=4"]
    run_cli(["train", "toy", *common, "--runs-dir", tmp_path / "a"], env=env, check=0)
    exe = Path(sys.executable).parent / "medcfx"
    proc = subprocess.Popen([str(exe), "train", "toy", *map(str, common), "--runs-dir", str(tmp_path / "b"), "--slow", "0.3"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "b" / "toy" / "toyset" / "v1" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ck / "step-00000008").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ck / "step-00000008").exists(), "the run never reached its second checkpoint"
    assert not (tmp_path / "b" / "toy" / "toyset" / "v1" / "model.safetensors").exists()  # it was killed mid-way
    run_cli(["train", "toy", *common, "--runs-dir", tmp_path / "b", "--resume"], env=env, check=0)

    def losses(root):
        rows = (root / "toy" / "toyset" / "v1" / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, rows)]

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _ in b] == list(range(1, 15))
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=0, atol=1e-6)
    wa = load_file(str(tmp_path / "a" / "toy" / "toyset" / "v1" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "toy" / "toyset" / "v1" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_resume_refuses_a_different_config(home, toy_site, toy_data, tmp_path):
    env = cli_env(home, toy_site)
    common = ["--data", toy_data, "--device", "cpu", "--runs-dir", tmp_path / "r"]
    run_cli(["train", "toy", *common, "--set", "train.steps=2"], env=env, check=0)
    proc = run_cli(["train", "toy", *common, "--set", "train.steps=2", "--set", "train.lr=0.5", "--resume"], env=env)
    assert proc.returncode == 2 and "config differs" in proc.stderr


def test_two_process_ddp_matches_one_process(home, toy_site, toy_data, tmp_path):
    env = cli_env(home, toy_site)
    common = ["--data", toy_data, "--device", "cpu", "--seed", "2", "--set", "train.steps=5", "--set", "train.batch_size=8"]
    run_cli(["train", "toy", *common, "--runs-dir", tmp_path / "one", "--dump-rank-weights", tmp_path / "one-ranks"],
            env=env, check=0)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "medcfx", "train", "toy",
                           *map(str, common), "--runs-dir", str(tmp_path / "two"),
                           "--dump-rank-weights", str(tmp_path / "two-ranks")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "two-ranks" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "two-ranks" / "rank1.safetensors"))
    one = load_file(str(tmp_path / "one-ranks" / "rank0.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged at {k}"
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5)
    # rank 0 alone wrote the run folder and registered once
    listing = json.loads(run_cli(["models", "list", "--json"], env=env, check=0).stdout)
    assert sorted(e["version"] for e in listing if e["name"] == "toy") == [1, 2]
    assert [p.name for p in (tmp_path / "two" / "toy" / "toyset").iterdir() if p.name.startswith("v")] == ["v1"]
