"""x0 processing against numpy references."""

import numpy as np
import pytest
import torch

from medcfx.diffusion import dynamic_normalise, dynamic_threshold_values, static_clip
from medcfx.errors import UsageError


def numpy_reference(x, p, per_channel):
    """Loop over samples (and channels) with np.quantile's default linear interpolation."""
    out = np.empty_like(x)
    s_all = np.empty(x.shape[:2] if per_channel else x.shape[:1])
    for b in range(x.shape[0]):
        groups = range(x.shape[1]) if per_channel else [slice(None)]
        for c in groups:
            v = x[b, c]
            s = max(1.0, np.quantile(np.abs(v), p))
            out[b, c] = np.clip(v, -s, s) / s
            if per_channel:
                s_all[b, c] = s
            else:
                s_all[b] = s
    return out, s_all


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 9, 7)) * np.array([0.2, 3.0, 8.0])[None, :, None, None]
    x[1] *= 0.02  # a sample entirely inside [-1, 1]: s floors at 1
    x[2, 1, 0, 0] = 50.0  # an outlier
    return x


@pytest.mark.parametrize("p", [0.99, 0.9, 0.5, 1.0])
@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_normalise_matches_numpy(p, per_channel):
    x = _data()
    expected, s_expected = numpy_reference(x, p, per_channel)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        xt = torch.tensor(x, dtype=dtype)
        s = dynamic_threshold_values(xt, p, per_channel)
        assert s.dim() == 4 and s.dtype == dtype
        np.testing.assert_allclose(s.reshape(s_expected.shape).numpy(), s_expected, rtol=tol)
        out = dynamic_normalise(p, per_channel)(xt)
        assert out.dtype == dtype
        np.testing.assert_allclose(out.numpy(), expected, rtol=tol, atol=tol)
    # the floor is exercised: some s are exactly 1, some are larger
    assert (s_expected == 1.0).any() and (s_expected > 1.0).any()


def test_dynamic_normalise_leaves_in_range_data_alone_and_bounds_output():
    x = torch.rand(2, 2, 8, 8) * 2 - 1
    assert torch.equal(dynamic_normalise()(x), x)
    y = dynamic_normalise()(10 * torch.randn(2, 2, 8, 8))
    assert y.abs().max().item() <= 1.0 + 1e-6


def test_dynamic_normalise_beyond_torch_quantile_size_limit():
    # torch.quantile refuses inputs over 2**24 elements; the kthvalue implementation has no such limit.
    n = 4097
    x = torch.linspace(-3, 3, n * n).reshape(1, 1, n, n)  # 16.8M elements, values known in closed form
    s = dynamic_threshold_values(x, 0.99, True).item()
    ref = np.quantile(np.abs(x.numpy().ravel()), 0.99)
    assert abs(s - ref) < 1e-5 * ref


def test_static_clip():
    x = _data()
    np.testing.assert_array_equal(static_clip(torch.tensor(x)).numpy(), np.clip(x, -1, 1))


@pytest.mark.parametrize("p", [0.0, 99, -0.5])
def test_bad_percentile(p):
    with pytest.raises(UsageError, match="fraction"):
        dynamic_normalise(p)
    with pytest.raises(UsageError):
        dynamic_threshold_values(torch.zeros(1, 1, 2, 2), p, True)
