"""Classifier-free and classifier-gradient guidance against hand computations."""

import math

import numpy as np
import pytest
import torch

from medcfx.diffusion import Schedule
from medcfx.diffusion import classifier_free, classifier_gradient, decode, log_prob_gradient, make_betas
from medcfx.errors import UsageError

NULL = 2


class CountingDenoiser:
    """eps depends on x, t, the label y and an extra conditioning image, so mixing them up shows."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append({"batch": x.shape[0], "y": cond["y"].tolist(), "keys": sorted(cond)})
        y = cond["y"].to(x.dtype).reshape(-1, 1, 1, 1)
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.sin(x * (1 + y)) + 0.01 * tt * y + cond["cond_image"] * (y - 0.5)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 500, 990])
    cond = {"y": torch.tensor([0, 1, 0]), "cond_image": torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)}
    return x, t, cond


@pytest.mark.parametrize("w", [3.0, 0.5, -1.0])
def test_classifier_free_matches_two_separate_calls_in_one_call(w):
    x, t, cond = _inputs()
    ref = CountingDenoiser()
    eps_c = ref(x, t, cond)
    eps_null = ref(x, t, {**cond, "y": torch.full((3,), NULL)})
    expected = w * eps_c + (1 - w) * eps_null  # the paper's form

    den = CountingDenoiser()
    out = classifier_free(den, w, NULL)(x, t, cond)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)
    assert len(den.calls) == 1
    assert den.calls[0]["batch"] == 6 and den.calls[0]["y"] == [0, 1, 0, NULL, NULL, NULL]
    assert den.calls[0]["keys"] == ["cond_image", "y"]


def test_classifier_free_scale_one_and_zero_use_one_branch():
    x, t, cond = _inputs(1)
    ref = CountingDenoiser()
    den = CountingDenoiser()
    out1 = classifier_free(den, 1.0, NULL)(x, t, cond)
    assert torch.equal(out1, ref(x, t, cond)) and den.calls[-1]["batch"] == 3
    out0 = classifier_free(den, 0.0, NULL)(x, t, cond)
    assert torch.equal(out0, ref(x, t, {**cond, "y": torch.full((3,), NULL)}))
    assert den.calls[-1]["y"] == [NULL] * 3 and len(den.calls) == 2


def test_classifier_free_one_call_per_decode_step_and_missing_key():
    x, _, cond = _inputs(2)
    den = CountingDenoiser()
    respaced = Schedule.create("linear", 1000).respace("ddim100")
    decode(classifier_free(den, 3.0, NULL), x, respaced, 25, cond)
    assert len(den.calls) == 25 and all(c["batch"] == 6 for c in den.calls)
    with pytest.raises(UsageError, match="'y'"):
        classifier_free(den, 3.0, NULL)(x, torch.tensor([1, 1, 1]), {"cond_image": cond["cond_image"]})


def test_classifier_free_composes_with_itself_on_another_key():
    # Two conditions guided independently: the outer wrapper repeats the inner key, the inner one doubles
    # again, and the results equal the explicit 4-term combination.
    def den(x, t, cond):
        return x * cond["y"].reshape(-1, 1, 1, 1) + cond["z"].reshape(-1, 1, 1, 1) ** 2

    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([3, 3])
    cond = {"y": torch.tensor([1.0, 2.0], dtype=torch.float64), "z": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    g = classifier_free(classifier_free(den, 2.0, 0.0, key="y"), 3.0, 0.0, key="z")

    def e(y, z):
        return den(x, t, {"y": y, "z": z})

    zero = torch.zeros(2, dtype=torch.float64)
    inner = lambda z: 2.0 * e(cond["y"], z) + (1 - 2.0) * e(zero, z)  # noqa: E731
    expected = 3.0 * inner(cond["z"]) + (1 - 3.0) * inner(zero)
    np.testing.assert_allclose(g(x, t, cond).numpy(), expected.numpy(), rtol=1e-12)


def test_classifier_gradient_with_gaussian_log_prob():
    sched = Schedule.create("linear", 1000)
    abar_np = np.cumprod(1 - make_betas("linear", 1000))
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 2, 4, 4, generator=g)
    x = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])

    def log_normal(xg, t_, cond):  # log N(x; mu, I) per sample, up to a constant
        return -0.5 * ((xg - mu) ** 2).flatten(1).sum(1)

    grad_fn = log_prob_gradient(log_normal)
    with torch.no_grad():  # samplers run without grad; the gradient must still be computed
        grad = grad_fn(x, t, {})
    np.testing.assert_allclose(grad.numpy(), (mu - x).numpy(), rtol=1e-6, atol=1e-6)
    assert not grad.requires_grad

    base = lambda x_, t_, c: 0.3 * x_  # noqa: E731
    scale = 100.0
    with torch.no_grad():
        out = classifier_gradient(base, grad_fn, scale, sched)(x, t, {})
    a = abar_np[t.numpy()][:, None, None, None]
    expected = 0.3 * x.numpy() - scale * np.sqrt(1 - a) * (mu.numpy() - x.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert out.dtype == torch.float32
    # scale 0 leaves eps untouched without evaluating the classifier
    assert torch.equal(classifier_gradient(base, lambda *a: 1 / 0, 0.0, sched)(x, t, {}), base(x, t, {}))


def test_log_prob_gradient_through_a_classifier_module_and_shape_check():
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))

    def log_p(xg, t, cond):
        return torch.log_softmax(clf(xg), dim=1).gather(1, cond["y"][:, None])[:, 0]

    x = torch.randn(4, 2, 2, 2)
    cond = {"y": torch.tensor([0, 1, 2, 1])}
    grad = log_prob_gradient(log_p)(x, torch.zeros(4, dtype=torch.int64), cond)
    # finite differences on one coordinate of each sample (independent of autograd)
    h = 1e-3
    for b in range(4):
        xp, xm = x.clone(), x.clone()
        xp[b, 1, 0, 1] += h
        xm[b, 1, 0, 1] -= h
        fd = (log_p(xp, None, cond)[b] - log_p(xm, None, cond)[b]).item() / (2 * h)
        assert math.isclose(grad[b, 1, 0, 1].item(), fd, rel_tol=1e-2, abs_tol=1e-3)
    assert all(p.grad is None for p in clf.parameters())  # gradient taken w.r.t. x only
    with pytest.raises(UsageError):
        log_prob_gradient(lambda xg, t, c: xg.sum())(x, None, cond)


def test_guidance_interval_guides_inside_and_uses_the_plain_branch_outside():
    """Kynkaanniemi et al. 2024: guided at lo <= t <= hi (inclusive), the conditional branch alone elsewhere;
    a batch that straddles the bounds is mixed per sample, the expected values from separate calls."""
    from medcfx.diffusion import guidance_interval

    x, t, cond = _inputs(2)  # t = 5, 500, 990
    ref = CountingDenoiser()
    guided_ref = classifier_free(ref, 3.0, NULL)(x, t, cond)
    plain_ref = ref(x, t, cond)
    den = CountingDenoiser()
    f = guidance_interval(classifier_free(den, 3.0, NULL), den, 5, 500)
    out = f(x, t, cond)
    torch.testing.assert_close(out[:2], guided_ref[:2], rtol=0, atol=0)  # t = 5 and 500: both bounds inside
    torch.testing.assert_close(out[2:], plain_ref[2:], rtol=0, atol=0)
    den.calls.clear()
    t_out = torch.full((3,), 990)
    assert torch.equal(f(x, t_out, cond), ref(x, t_out, cond))
    assert [c["batch"] for c in den.calls] == [3]  # one forward of B, no null branch
    den.calls.clear()
    t_in = torch.full((3,), 250)
    assert torch.equal(f(x, t_in, cond), classifier_free(ref, 3.0, NULL)(x, t_in, cond))
    assert [c["batch"] for c in den.calls] == [6]
    with pytest.raises(UsageError, match="t_lo <= t_hi"):
        guidance_interval(den, den, 600, 500)
