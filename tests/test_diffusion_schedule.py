"""Schedules, respacing and the level convention, checked against independent computations."""

import math

import numpy as np
import pytest
import torch

from medcfx.diffusion import Schedule, make_betas, parse_respacing
from medcfx.errors import UsageError


@pytest.mark.parametrize("T", [1000, 250, 21])
def test_linear_alphas_cumprod_matches_explicit_loop(T):
    # Independent: betas by the DDPM formula written element by element, product by a Python loop,
    # and a second route through the sum of logs.
    b0, b1 = 1e-4 * 1000 / T, 0.02 * 1000 / T
    prod, expected = 1.0, []
    log_sum, via_logs = 0.0, []
    for i in range(T):
        beta = b0 + (b1 - b0) * i / (T - 1)
        prod *= 1.0 - beta
        expected.append(prod)
        log_sum += math.log1p(-beta)
        via_logs.append(math.exp(log_sum))
    sched = Schedule.create("linear", T)
    assert sched.T == T
    assert sched.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), via_logs, rtol=1e-10)
    assert make_betas("linear", T)[0] == pytest.approx(b0, rel=1e-15)
    assert make_betas("linear", T)[-1] == pytest.approx(b1, rel=1e-15)


def test_cosine_alphas_cumprod_matches_closed_form():
    T, s = 1000, 0.008

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    sched = Schedule.create("cosine", T)
    betas = make_betas("cosine", T)
    assert betas.max() <= 0.999 + 1e-15
    unclipped = [t for t in range(T) if 1 - f(t + 1) / f(t) < 0.999]
    assert len(unclipped) == T - 1  # only the very last step is clipped for T = 1000
    closed = np.array([f(t + 1) / f(0) for t in unclipped])
    np.testing.assert_allclose(sched.alphas_cumprod.numpy()[unclipped], closed, rtol=1e-9)
    assert betas[-1] == pytest.approx(0.999)


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(UsageError, match="linear.*cosine"):
        make_betas("quadratic", 1000)
    for bad_T in (0, -3, 2.5, True, 20):  # T = 20: linear beta_end = 0.02 * 1000 / 20 = 1
        with pytest.raises(UsageError):
            make_betas("linear", bad_T)


def test_bad_betas_rejected():
    for betas in ([], [0.1, 0.0], [0.5, 1.5]):
        with pytest.raises(UsageError):
            Schedule(betas)


def test_ddim100_respacing_and_levels():
    sched = Schedule.create("linear", 1000)
    r = sched.respace("ddim100")
    assert r.N == 100
    assert r.timesteps.dtype == torch.int64
    assert r.timesteps.tolist() == list(range(0, 1000, 10))
    assert r.abar.dtype == torch.float64 and r.abar.shape == (101,)
    assert r.abar[0].item() == 1.0
    assert r.abar[1].item() == sched.alphas_cumprod[0].item()
    assert r.abar[100].item() == sched.alphas_cumprod[990].item()
    assert r.abar[37].item() == sched.alphas_cumprod[360].item()
    assert r.t_of(1) == 0 and r.t_of(100) == 990 and r.t_of(37) == 360
    for k in (0, 101):
        with pytest.raises(UsageError):
            r.t_of(k)


def test_ddim_rule_searches_the_stride_like_adm():
    # T // N = 333 would give 4 timesteps (0, 333, 666, 999); the ADM rule picks the first stride with
    # exactly 3.
    ts = parse_respacing("ddim3", 1000)
    assert ts == [0, 334, 668]
    assert parse_respacing("ddim1000", 1000) == list(range(1000))
    with pytest.raises(UsageError, match="no integer stride"):
        parse_respacing("ddim6", 10)  # strides give 10, 5, 4, 3, 2, 2, ... timesteps: never 6


def test_integer_respacing_section_rule():
    # 999 / 9 = 111 exactly: no rounding involved.
    assert parse_respacing(10, 1000) == list(range(0, 1000, 111))
    assert parse_respacing("10", 1000) == parse_respacing(10, 1000)
    assert parse_respacing(1, 1000) == [0]
    for n in (7, 50, 100, 333):
        ts = parse_respacing(n, 1000)
        assert len(ts) == n and ts[0] == 0 and ts[-1] == 999
        gaps = np.diff(ts)
        assert gaps.min() >= 1 and np.all(np.abs(gaps - 999 / (n - 1)) <= 1.0)
    assert parse_respacing("all", 1000) == list(range(1000))
    assert parse_respacing(1000, 1000) == list(range(1000))


@pytest.mark.parametrize("spec", ["ddim0", "ddimx", "ddim", "abc", "1.5", "", 0, 1001, -5, True, 2.5, None])
def test_invalid_respacing_specs(spec):
    with pytest.raises(UsageError):
        Schedule.create("linear", 1000).respace(spec)


def test_level_for_fraction():
    r = Schedule.create("linear", 1000).respace("ddim100")
    assert r.level_for_fraction(0.75) == 75
    assert r.level_for_fraction(0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert r.level_for_fraction(0.0) == 0 and r.level_for_fraction(1.0) == 100
    r250 = Schedule.create("linear", 1000).respace(250)
    assert r250.level_for_fraction(0.5) == 125
    for f in (-0.1, 1.2):
        with pytest.raises(UsageError):
            r.level_for_fraction(f)


def test_abar_lookup_shape_dtype_and_validation():
    sched = Schedule.create("linear", 1000)
    t = torch.tensor([0, 500, 999])
    a = sched.abar(t)
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float32
    np.testing.assert_allclose(a.flatten().numpy(), sched.alphas_cumprod[[0, 500, 999]].numpy(), rtol=1e-6)
    assert sched.abar(t, ndim=2).shape == (3, 1)
    with pytest.raises(UsageError):
        sched.abar(torch.tensor([1000]))
    with pytest.raises(UsageError):
        sched.abar(torch.tensor([-1]))
    with pytest.raises(UsageError):
        sched.abar(torch.tensor([1.0]))


def test_q_sample_formula_and_statistics():
    sched = Schedule.create("linear", 1000)
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    # exact formula for a given noise
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    noise = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.q_sample(x0, t, noise)
    a = ac[t.numpy()][:, None, None, None]
    expected = np.sqrt(a) * x0.numpy() + np.sqrt(1 - a) * noise.numpy()
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-5, atol=1e-6)
    # statistics: many draws of one image per timestep
    n = 100_000
    base = torch.tensor([0.7, -0.4]).reshape(1, 2, 1, 1).expand(n, 2, 1, 1)
    for ti in (50, 400, 900):
        tt = torch.full((n,), ti, dtype=torch.int64)
        draws = sched.q_sample(base, tt, torch.randn(n, 2, 1, 1, generator=g))
        mean = draws.mean(0).flatten().numpy()
        var = draws.var(0).flatten().numpy()
        sd = math.sqrt(1 - ac[ti])
        np.testing.assert_allclose(mean, math.sqrt(ac[ti]) * np.array([0.7, -0.4]), atol=5 * sd / math.sqrt(n))
        np.testing.assert_allclose(var, 1 - ac[ti], rtol=5 * math.sqrt(2 / n))
