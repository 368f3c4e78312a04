"""DDIM / DDPM steps and the encode / decode / sample loops against hand-written formulas."""

import math

import numpy as np
import pytest
import torch

from medcfx.diffusion import (
    Schedule,
    ddim_inverse_step,
    ddim_step,
    ddpm_step,
    decode,
    dpmpp2m_step,
    dynamic_normalise,
    encode,
    eps_from_x0,
    predict_eps,
    predict_x0,
    sample,
)
from medcfx.errors import UsageError

SCHED = Schedule.create("linear", 1000)
R100 = SCHED.respace("ddim100")


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- single steps


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("a_k,a_prev", [(0.3, 0.5), (0.01, 0.02), (0.9, 1.0), (4e-5, 6e-5)])
def test_ddim_step_matches_numpy_formula(eta, a_k, a_prev):
    x, eps, z = _rand(2, 3, 4, 4, seed=1), _rand(2, 3, 4, 4, seed=2), _rand(2, 3, 4, 4, seed=3)
    xn, en, zn = x.numpy(), eps.numpy(), z.numpy()
    # Song et al. eq. 12 written out in numpy, going through x0 explicitly.
    x0 = (xn - np.sqrt(1 - a_k) * en) / np.sqrt(a_k)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_k)) * np.sqrt(1 - a_k / a_prev)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * en + sigma * zn
    out = ddim_step(x, eps, a_k, a_prev, eta=eta, noise=z)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-9)
    # float32 path agrees to float32 precision (relative to the size of the terms, ~1/sqrt(a_k))
    out32 = ddim_step(x.float(), eps.float(), a_k, a_prev, eta=eta, noise=z.float())
    scale = np.abs(x0).max() + 1
    np.testing.assert_allclose(out32.numpy(), expected, atol=1e-6 * scale / math.sqrt(a_k) + 1e-6)


def test_ddim_step_eta0_ignores_noise_and_rejects_bad_eta():
    x, eps = _rand(1, 1, 3, 3, seed=4), _rand(1, 1, 3, 3, seed=5)
    a = ddim_step(x, eps, 0.3, 0.6, eta=0.0, noise=None)
    b = ddim_step(x, eps, 0.3, 0.6, eta=0.0, noise=_rand(1, 1, 3, 3, seed=6))
    assert torch.equal(a, b)
    for eta in (-0.1, 1.5):
        with pytest.raises(UsageError):
            ddim_step(x, eps, 0.3, 0.6, eta=eta)


def test_per_sample_abar_tensors_match_scalar_calls():
    x, eps, z = _rand(3, 2, 2, 2, seed=7), _rand(3, 2, 2, 2, seed=8), _rand(3, 2, 2, 2, seed=9)
    ak = [0.2, 0.05, 0.7]
    ap = [0.3, 0.1, 1.0]
    ak_t = torch.tensor(ak).reshape(3, 1, 1, 1)  # float32, like Schedule.abar
    ap_t = torch.tensor(ap, dtype=torch.float64).reshape(3, 1, 1, 1)
    batched = ddim_step(x, eps, ak_t, ap_t, 0.7, z)
    for i in range(3):
        single = ddim_step(x[i : i + 1], eps[i : i + 1], ak[i], ap[i], 0.7, z[i : i + 1])
        # ak given as float32 tensor in the batched call: compare at float32-abar precision
        np.testing.assert_allclose(batched[i : i + 1].numpy(), single.numpy(), rtol=1e-5, atol=1e-6)


def test_predict_x0_and_eps_from_x0_are_inverse_formulas():
    x, eps = _rand(2, 1, 5, 5, seed=10), _rand(2, 1, 5, 5, seed=11)
    for a in (0.999, 0.5, 0.01):
        x0 = predict_x0(x, eps, a)
        np.testing.assert_allclose(x0.numpy(), (x.numpy() - math.sqrt(1 - a) * eps.numpy()) / math.sqrt(a), rtol=1e-12)
        np.testing.assert_allclose(eps_from_x0(x, x0, a).numpy(), eps.numpy(), rtol=1e-9, atol=1e-9)


def _posterior(x_t, x0, a_k, a_prev):
    """q(x_{k-1} | x_k, x0) in the x0 parameterisation (Ho et al. eq. 7) with beta = 1 - a_k / a_prev."""
    beta = 1 - a_k / a_prev
    mean = np.sqrt(a_prev) * beta / (1 - a_k) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_k) * x_t
    var = beta * (1 - a_prev) / (1 - a_k)
    return mean, var


@pytest.mark.parametrize("a_k,a_prev", [(0.3, 0.5), (0.01, 0.02), (0.98, 0.99), (0.9, 1.0)])
def test_ddpm_step_and_ddim_eta1_equal_the_posterior(a_k, a_prev):
    x, eps, z = _rand(2, 2, 3, 3, seed=12), _rand(2, 2, 3, 3, seed=13), _rand(2, 2, 3, 3, seed=14)
    x0 = (x.numpy() - np.sqrt(1 - a_k) * eps.numpy()) / np.sqrt(a_k)
    mean, var = _posterior(x.numpy(), x0, a_k, a_prev)
    for noise, expected in ((torch.zeros_like(z), mean), (z, mean + np.sqrt(var) * z.numpy())):
        np.testing.assert_allclose(ddpm_step(x, eps, a_k, a_prev, noise).numpy(), expected, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ddim_step(x, eps, a_k, a_prev, 1.0, noise).numpy(), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ddpm_step(x, eps, a_k, a_prev, None).numpy(), mean, rtol=1e-9, atol=1e-9)
    if a_prev == 1.0:  # last step: variance 0, the result is the x0 estimate itself
        assert var == 0.0
        np.testing.assert_allclose(ddpm_step(x, eps, a_k, a_prev, z).numpy(), x0, rtol=1e-9, atol=1e-9)


def test_ddim_inverse_step_inverts_ddim_step():
    x, eps = _rand(2, 3, 4, 4, seed=15), _rand(2, 3, 4, 4, seed=16)
    for a_prev, a_k in ((1.0, 0.999), (0.5, 0.3), (2e-4, 5e-5)):
        up = ddim_inverse_step(x, eps, a_prev, a_k)
        # independent formula: sqrt(a_k) x0 + sqrt(1 - a_k) eps
        x0 = (x.numpy() - np.sqrt(1 - a_prev) * eps.numpy()) / np.sqrt(a_prev)
        np.testing.assert_allclose(up.numpy(), np.sqrt(a_k) * x0 + np.sqrt(1 - a_k) * eps.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ddim_step(up, eps, a_k, a_prev).numpy(), x.numpy(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- eps evaluation and x0 processing


def test_predict_eps_rederives_eps_from_processed_x0():
    x = 3.0 * _rand(2, 2, 6, 6, seed=17)
    raw = _rand(2, 2, 6, 6, seed=18)

    def den(x_, t, cond):
        return raw

    proc = dynamic_normalise(0.9)
    a = 0.4
    eps = predict_eps(den, x, 500, a, None, proc)
    expected_x0 = proc(predict_x0(x, raw, a))
    assert not torch.allclose(expected_x0, predict_x0(x, raw, a))  # the process did something
    np.testing.assert_allclose(predict_x0(x, eps, a).numpy(), expected_x0.numpy(), rtol=1e-9, atol=1e-9)
    # level 0 (clean data): x is its own x0, the model eps is returned untouched
    assert torch.equal(predict_eps(den, x, 0, 1.0, None, proc), raw)


def test_predict_eps_broadcasts_t_and_checks_shape():
    seen = []

    def den(x, t, cond):
        seen.append((t.dtype, tuple(t.shape), t.tolist(), dict(cond)))
        return torch.zeros_like(x)

    predict_eps(den, torch.zeros(3, 1, 2, 2), 42, 0.5, {"y": torch.tensor([1, 0, 1])})
    assert seen[0][0] == torch.int64 and seen[0][1] == (3,) and seen[0][2] == [42, 42, 42]
    assert set(seen[0][3]) == {"y"}
    with pytest.raises(UsageError):
        predict_eps(lambda x, t, c: torch.zeros(1), torch.zeros(3, 1, 2, 2), 1, 0.5)


# ---------------------------------------------------------------- loops and the level convention

FIXED = _rand(2, 3, 8, 8, seed=19)


def g_of_t(t: torch.Tensor) -> torch.Tensor:
    """Strongly varying in t: neighbouring respaced timesteps give very different values."""
    tf = t.to(torch.float64)
    return (3.0 * torch.cos(tf * 0.37) + 0.5 * (t % 7).to(torch.float64)).reshape(-1, 1, 1, 1)


def x_independent_denoiser(x, t, cond):
    return g_of_t(t) * FIXED


def shifted_encode(den, x0, respaced, L):
    """The off-by-one we guard against, written independently: level k-1 -> k evaluated at the model
    timestep of level k+1 instead of level k."""
    x = x0
    for k in range(1, L + 1):
        t_wrong = int(respaced.timesteps[min(k, respaced.N - 1)])
        eps = den(x, torch.full((x.shape[0],), t_wrong), {})
        x = ddim_inverse_step(x, eps, respaced.abar[k - 1].item(), respaced.abar[k].item())
    return x


@pytest.mark.parametrize("L", [1, 37, 100])
def test_encode_decode_exact_inverse_and_shifted_variant_fails(L):
    # Tolerance logic: in float64 each step is an affine map whose inverse is applied with the same eps,
    # so the round trip error is ~1e-16 * |x_L| / sqrt(abar_L) (<1e-12 here); 1e-5 is far above it.
    x0 = _rand(2, 3, 8, 8, seed=20).clamp(-1, 1)
    xL = encode(x_independent_denoiser, x0, R100, L)
    back = decode(x_independent_denoiser, xL, R100, L)
    assert (back - x0).abs().max().item() < 1e-5
    wrong = decode(x_independent_denoiser, shifted_encode(x_independent_denoiser, x0, R100, L), R100, L)
    assert (wrong - x0).abs().max().item() > 1e-2


def test_encode_decode_float32_round_trip():
    # Tolerance logic in float32: each of the 2L steps rounds x to ~2^-24 * |x| (|x| <= max|x_L| ~ 4 here);
    # mapped back to x0, an error made at noise level k is amplified by at most 1 / sqrt(abar_L). Worst-case
    # linear accumulation: 2L * 2^-24 * max|x_L| / sqrt(abar_L), ~6e-4 for L = 75 of ddim100 (the paper's
    # default); the shifted variant errs by more than 1e-2, so the bound still discriminates.
    x0 = _rand(2, 3, 8, 8, seed=21, dtype=torch.float32).clamp(-1, 1)
    fixed32 = FIXED.float()

    def den(x, t, cond):
        return (g_of_t(t) * fixed32).float()

    L = 75
    xL = encode(den, x0, R100, L)
    back = decode(den, xL, R100, L)
    assert back.dtype == torch.float32
    tol = 2 * L * 2.0**-24 * xL.abs().max().item() / math.sqrt(R100.abar[L].item())
    assert tol < 1e-3
    assert (back - x0).abs().max().item() < tol
    wrong = decode(den, shifted_encode(den, x0, R100, L), R100, L)
    assert (wrong - x0).abs().max().item() > 1e-2


def test_loops_call_the_right_timesteps_and_levels():
    calls = []

    def den(x, t, cond):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    levels = []
    x0 = torch.zeros(1, 1, 2, 2)
    encode(den, x0, R100, 4, callback=lambda k, x: levels.append(k))
    assert calls == [0, 10, 20, 30] and levels == [1, 2, 3, 4]
    calls.clear(), levels.clear()
    decode(den, x0, R100, 4, callback=lambda k, x: levels.append(k))
    assert calls == [30, 20, 10, 0] and levels == [3, 2, 1, 0]


def test_level_validation_and_L0_identity():
    x = torch.randn(1, 1, 2, 2)
    assert encode(x_independent_denoiser, x, R100, 0) is x
    assert decode(x_independent_denoiser, x, R100, 0) is x
    for L in (-1, 101, 1.5, True, "3"):
        with pytest.raises(UsageError):
            encode(x_independent_denoiser, x, R100, L)
        with pytest.raises(UsageError):
            decode(x_independent_denoiser, x, R100, L)
    assert decode(lambda x, t, c: torch.zeros_like(x), x, R100, np.int64(2)).shape == x.shape


def test_stochastic_decode_is_reproducible_with_a_generator():
    x = _rand(2, 1, 4, 4, seed=22, dtype=torch.float32)
    den = lambda x, t, c: 0.1 * x  # noqa: E731
    a = decode(den, x, R100, 20, eta=0.5, generator=torch.Generator().manual_seed(5))
    b = decode(den, x, R100, 20, eta=0.5, generator=torch.Generator().manual_seed(5))
    c = decode(den, x, R100, 20, eta=0.5, generator=torch.Generator().manual_seed(6))
    d = decode(den, x, R100, 20, eta=0.0)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)


# ---------------------------------------------------------------- sampling Gaussian data

MU, S = 0.3, 0.5


def gaussian_optimal_denoiser(schedule):
    """For data x0 ~ N(mu, s^2 I): x_t = sqrt(a) x0 + sqrt(1-a) eps is jointly Gaussian with eps, so
    E[eps | x_t] = Cov(eps, x_t) / Var(x_t) (x_t - E x_t) = sqrt(1-a) / (a s^2 + 1 - a) (x_t - sqrt(a) mu)."""

    def den(x, t, cond):
        assert bool((t == t[0]).all())  # samplers call with one timestep per step; keeps this cheap
        a = schedule.alphas_cumprod[int(t[0])].item()
        return math.sqrt(1 - a) / (a * S**2 + 1 - a) * (x - math.sqrt(a) * MU)

    return den


def exact_chain_moments(respaced, ddpm):
    """Mean and std of the discrete sampler's output, propagated exactly through the linear-Gaussian chain
    (x_N ~ N(0, 1)); independent of the library: posterior in x0 form, DDIM in x0 form."""
    m, v = 0.0, 1.0
    for k in range(respaced.N, 0, -1):
        a, ap = respaced.abar[k].item(), respaced.abar[k - 1].item()
        gain = math.sqrt(1 - a) / (a * S**2 + 1 - a)
        # eps = gain * x - gain * sqrt(a) mu ; x0 = (x - sqrt(1-a) eps) / sqrt(a) = p x + q
        p = (1 - math.sqrt(1 - a) * gain) / math.sqrt(a)
        q = math.sqrt(1 - a) * gain * math.sqrt(a) * MU / math.sqrt(a)
        if ddpm:
            beta = 1 - a / ap
            c0 = math.sqrt(ap) * beta / (1 - a)
            ct = math.sqrt(1 - beta) * (1 - ap) / (1 - a)
            A, B, var = c0 * p + ct, c0 * q, beta * (1 - ap) / (1 - a)
        else:
            ce = math.sqrt(1 - ap)
            A, B, var = math.sqrt(ap) * p + ce * gain, math.sqrt(ap) * q - ce * gain * math.sqrt(a) * MU, 0.0
        m, v = A * m + B, A * A * v + var
    return m, math.sqrt(v)


@pytest.mark.parametrize("ddpm,spec", [(True, "all"), (False, "ddim100")])
def test_sampling_gaussian_data_recovers_its_moments(ddpm, spec):
    respaced = SCHED.respace(spec)
    n = 8_000  # 16k values stay below torch's intra-op parallel grain: fast on a busy 2-core CPU
    out = sample(gaussian_optimal_denoiser(SCHED), (n, 1, 1, 2), respaced, ddpm=ddpm,
                 generator=torch.Generator().manual_seed(123))
    assert out.dtype == torch.float32 and out.shape == (n, 1, 1, 2)
    vals = out.double().flatten()
    count = vals.numel()  # the 2 pixels are independent draws
    m_exact, s_exact = exact_chain_moments(respaced, ddpm)
    se_mean, se_std = S / math.sqrt(count), S / math.sqrt(2 * count)
    # 1) the sampler realises exactly the discrete chain: within 4 standard errors
    assert abs(vals.mean().item() - m_exact) < 4 * se_mean
    assert abs(vals.std().item() - s_exact) < 4 * se_std
    # 2) that chain reproduces the data distribution up to the discretisation bias of the sampler
    #    (posterior variance shrinks the std by < 1% with 1000 steps; DDIM with 100 steps by < 3%)
    assert abs(vals.mean().item() - MU) < 4 * se_mean + 0.002
    assert abs(vals.std().item() - S) < 0.03 * S


def test_sample_with_given_noise_equals_full_decode():
    noise = _rand(2, 1, 3, 3, seed=24, dtype=torch.float32)
    den = gaussian_optimal_denoiser(SCHED)
    out = sample(den, (2, 1, 3, 3), R100, noise=noise)
    np.testing.assert_allclose(out.numpy(), decode(den, noise, R100, R100.N).numpy(), rtol=0, atol=0)
    with pytest.raises(UsageError):
        sample(den, (2, 1, 4, 4), R100, noise=noise)


# ---------------------------------------------------------------- DPM-Solver++(2M)


def gaussian_flow(x, a_from, a_to):
    """The exact probability-flow ODE map between two noise levels for data N(MU, S^2): along the ODE the
    standardised value (x - sqrt(a) MU) / sqrt(a S^2 + 1 - a) is constant (a = 1 is clean data)."""
    scale = math.sqrt(a_to * S**2 + 1 - a_to) / math.sqrt(a_from * S**2 + 1 - a_from)
    return math.sqrt(a_to) * MU + scale * (x - math.sqrt(a_from) * MU)


def _solver_errors(solver, N, frac=0.75):
    den = gaussian_optimal_denoiser(SCHED)
    R = SCHED.respace(f"ddim{N}")
    L = round(frac * N)
    a_L = R.abar[L].item()
    x_L = torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_0 = torch.linspace(-1, 1, 13, dtype=torch.float64).reshape(-1, 1, 1, 1)
    dec = (decode(den, x_L, R, L, solver=solver) - gaussian_flow(x_L, a_L, 1.0)).abs().max().item()
    enc_x = encode(den, x_0, R, L, solver=solver)
    enc = (enc_x - gaussian_flow(x_0, 1.0, a_L)).abs().max().item()
    round_trip = (decode(den, enc_x, R, L, solver=solver) - x_0).abs().max().item()
    return dec, enc, round_trip


@pytest.mark.parametrize("N", [50, 100])
def test_dpmpp2m_follows_the_exact_flow_much_closer_than_ddim(N):
    # Against the closed-form ODE map of Gaussian data. Measured (N = 50 / 100): DDIM decode 8.3e-2 / 4.2e-2,
    # encode 3.2e-2 / 1.7e-2, round trip 8.3e-2 / 4.2e-2 (first order); DPM-Solver++(2M) 3.5e-3 / 3.2e-3,
    # 8.7e-3 / 4.7e-3, 1.4e-3 / 4.5e-4. A first-order or broken multistep term fails these margins.
    d_ddim, e_ddim, r_ddim = _solver_errors("ddim", N)
    d_2m, e_2m, r_2m = _solver_errors("dpm++2m", N)
    assert d_2m < d_ddim / 5 and e_2m < e_ddim / 3 and r_2m < r_ddim / 20
    assert r_2m < 2e-3


def test_dpmpp2m_round_trip_converges_at_second_order():
    # halving the step (50 -> 100) divides a second-order global error by about 4 (measured 3.0: the
    # first-order end steps add a little); a first-order method divides it by about 2 (DDIM: 2.0)
    r50, r100 = _solver_errors("dpm++2m", 50)[2], _solver_errors("dpm++2m", 100)[2]
    d50, d100 = _solver_errors("ddim", 50)[2], _solver_errors("ddim", 100)[2]
    assert r50 / r100 > 2.6 and d50 / d100 < 2.3


def test_dpmpp2m_first_step_is_the_ddim_step_and_history_enters_as_an_extrapolation():
    x, eps = _rand(2, 1, 4, 4, seed=30), _rand(2, 1, 4, 4, seed=31)
    a, ap = 0.3, 0.6
    x0 = predict_x0(x, eps, a)
    first, hist = dpmpp2m_step(x, x0, a, ap, None)
    torch.testing.assert_close(first, ddim_step(x, eps, a, ap), rtol=0, atol=1e-12)
    # with history (x0_prev, h_prev): the same step taken with D = x0 + (x0 - x0_prev) h / (2 h_prev)
    lam = lambda v: 0.5 * math.log(v / (1 - v))  # noqa: E731
    x0_prev = _rand(2, 1, 4, 4, seed=32)
    h_prev = 0.7
    second, _ = dpmpp2m_step(x, x0, a, ap, (x0_prev, h_prev))
    h = lam(ap) - lam(a)
    d = x0 + (x0 - x0_prev) * h / (2 * h_prev)
    eps_d = eps_from_x0(x, d, a)  # the DDIM step with x0 := D is the 2M step (data-prediction form)
    torch.testing.assert_close(second, ddim_step(x, eps_d, a, ap), rtol=0, atol=1e-12)
    assert hist[0] is x0 and abs(hist[1] - h) < 1e-15
    # to clean data (a = 1): the first-order value x0
    assert dpmpp2m_step(x, x0, a, 1.0, (x0_prev, h_prev))[0] is x0


def test_dpmpp2m_loops_call_the_same_number_of_timesteps_and_check_arguments():
    calls = []

    def den(x, t, cond):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    x0 = torch.zeros(1, 1, 2, 2)
    encode(den, x0, R100, 4, solver="dpm++2m")
    assert calls == [0, 10, 10, 20]  # DDIM's first two, then each level's own timestep
    calls.clear()
    decode(den, x0, R100, 4, solver="dpm++2m")
    assert calls == [30, 20, 10, 0]
    with pytest.raises(UsageError, match="unknown solver"):
        decode(den, x0, R100, 4, solver="heun")
    with pytest.raises(UsageError, match="eta must be 0"):
        decode(den, x0, R100, 4, solver="dpm++2m", eta=0.5)


# ---------------------------------------------------------------- DPM-Solver++(3M)


def test_dpmpp3m_step_is_exact_when_x0_is_quadratic_in_lambda():
    """The 3M step integrates x_to = (sigma_to / sigma_from) x + alpha_to int e^(lam - lam_to) x0(lam) dlam with x0
    quadratic through the three points: exact for a quadratic x0(lam), checked against scipy quadrature, with
    unequal earlier steps (r0 != r1)."""
    from scipy.integrate import quad

    from medcfx.diffusion import dpmpp3m_step

    lam = lambda v: 0.5 * math.log(v / (1 - v))  # noqa: E731
    a, at = 0.3, 0.55
    h = lam(at) - lam(a)
    h0, h1 = 0.8 * h, 1.3 * h
    fs = (lambda v: v**2, lambda v: 0.3 * v**2 - v, lambda v: 2.0 - 0.5 * v)  # three pixels, each its own x0(lam)

    def x0_at(v):
        return torch.tensor([f(v) for f in fs], dtype=torch.float64).reshape(3, 1, 1, 1)

    l0 = lam(a)
    x = _rand(3, 1, 1, 1, seed=40)
    got, hist = dpmpp3m_step(x, x0_at(l0), a, at, ((x0_at(l0 - h0), h0), (x0_at(l0 - h0 - h1), h1)))
    want = []
    for i, f in enumerate(fs):
        integral = quad(lambda v: math.exp(v - lam(at)) * f(v), l0, lam(at))[0]
        want.append(math.sqrt((1 - at) / (1 - a)) * x[i].item() + math.sqrt(at) * integral)
    np.testing.assert_allclose(got.flatten().numpy(), want, rtol=1e-12, atol=1e-12)
    assert len(hist) == 2 and abs(hist[0][1] - h) < 1e-15
    # with fewer earlier points it is the 2M / DDIM step
    torch.testing.assert_close(dpmpp3m_step(x, x0_at(l0), a, at, ((x0_at(l0 - h0), h0),))[0],
                               dpmpp2m_step(x, x0_at(l0), a, at, (x0_at(l0 - h0), h0))[0], rtol=0, atol=0)
    torch.testing.assert_close(dpmpp3m_step(x, x0_at(l0), a, at, None)[0],
                               dpmpp2m_step(x, x0_at(l0), a, at, None)[0], rtol=0, atol=0)


@pytest.mark.parametrize("N", [30, 50])
def test_dpmpp3m_inversion_follows_the_exact_flow_closer_than_2m(N):
    # the encode is where the third order shows on Gaussian data (measured N = 30 / 50: 2M 4.3e-3 / 8.7e-3,
    # 3M 7.2e-4 / 3.2e-3); the decode's error there is dominated by its low-order final steps
    e_2m = _solver_errors("dpm++2m", N)[1]
    e_3m = _solver_errors("dpm++3m", N)[1]
    assert e_3m < e_2m / 2
    d_3m = _solver_errors("dpm++3m", N)[0]
    assert d_3m < _solver_errors("ddim", N)[0] / 3  # and its decode still far closer than DDIM's
