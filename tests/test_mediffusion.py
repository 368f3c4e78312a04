"""Unit tests of the mediffusion plugin: losses, label subsampling, guidance, targets, the autoencoder."""

import math

import numpy as np
import pytest
import torch

from medcfx.diffusion import Schedule
from medcfx.errors import MedcfxError, UsageError
from medcfx.train import Batch
from medcfx_mediffusion import counterfactual as cf
from medcfx_mediffusion.autoencoder import AEConfig, AETrainModule, KLAutoencoder, PatchDiscriminator, ae_loss, kl_divergence, ssim
from medcfx_mediffusion.joint import (
    build_joint,
    choose_pool,
    encoder_features,
    joint_batches,
    joint_loss,
    loss_kind,
    masked_bce,
    masked_ce,
    pos_weights,
    subsample_labels,
)

NET = dict(in_channels=2, out_channels=2, image_size=8, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
           attention_resolutions=[4], dropout=0.0, num_head_channels=8, num_groups=4)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------ classification loss


def test_pos_weight_bce_matches_a_manual_computation():
    labels = np.array([[1, 0, np.nan], [0, 0, 1], [1, np.nan, 0], [np.nan, np.nan, np.nan], [0, 1, 0]], np.float32)
    pw = pos_weights(labels)
    # column 0: 2 positives, 2 negatives; column 1: 1 positive, 2 negatives; column 2: 1 positive, 2 negatives
    np.testing.assert_allclose(pw, [1.0, 2.0, 2.0])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=labels.shape).astype(np.float32)
    got = float(masked_bce(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(pw)))
    total, n = 0.0, 0
    for i in range(labels.shape[0]):
        for k in range(labels.shape[1]):
            y = labels[i, k]
            if np.isnan(y):
                continue
            p = _sigmoid(float(logits[i, k]))
            total += -(pw[k] * y * math.log(p) + (1 - y) * math.log(1 - p))
            n += 1
    assert got == pytest.approx(total / n, rel=1e-5)


def test_pos_weight_is_one_without_positives_or_negatives():
    np.testing.assert_allclose(pos_weights(np.array([[0, 1], [0, 1], [np.nan, np.nan]])), [1.0, 1.0])


def test_classification_loss_ignores_unlabelled_entries():
    labels = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [0.0, 1.0]])
    logits = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    pw = torch.tensor([2.0, 0.5])
    base = masked_bce(logits, labels, pw)
    changed = logits.clone()
    changed[1] += 5.0  # an unlabelled row
    changed[0, 1] -= 3.0  # an unlabelled entry of a labelled row
    assert float(masked_bce(changed, labels, pw)) == pytest.approx(float(base))
    changed[2, 0] += 1.0  # a labelled entry
    assert float(masked_bce(changed, labels, pw)) != pytest.approx(float(base))
    all_nan = torch.full((2, 2), float("nan"))
    assert float(masked_bce(logits[:2], all_nan, pw)) == 0.0


def test_masked_softmax_cross_entropy_uses_complete_rows_only():
    labels = np.array([[0, 1, 0], [np.nan, np.nan, np.nan], [1, 0, 0], [0, 0, 1]], np.float32)
    logits = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    got = float(masked_ce(torch.from_numpy(logits), torch.from_numpy(labels)))
    rows = [0, 2, 3]
    lse = np.log(np.exp(logits[rows]).sum(1))
    want = np.mean(lse - logits[rows, np.argmax(labels[rows], 1)])
    assert got == pytest.approx(float(want), rel=1e-5)


def test_loss_kind_auto():
    multi = np.array([[1, 1, 0], [0, 0, 0], [np.nan, np.nan, np.nan]])
    onehot = np.array([[1, 0, 0], [0, 0, 1], [np.nan, np.nan, np.nan]])
    assert loss_kind(multi, "auto") == "bce"
    assert loss_kind(onehot, "auto") == "ce"
    assert loss_kind(np.array([[1.0], [0.0]]), "auto") == "bce"
    assert loss_kind(onehot, "bce") == "bce"
    with pytest.raises(UsageError):
        loss_kind(onehot, "softmax")


def _batch(step, n, positions=None):
    pos = torch.arange(n) if positions is None else positions
    return Batch(step=step, seed=3, indices=torch.arange(n), positions=pos)


def test_joint_loss_masks_unlabelled_rows_and_respects_warmup():
    torch.manual_seed(0)
    model = build_joint(NET, {"hidden": 8, "pool": 1}, 2)
    latents = torch.randn(4, 2, 8, 8)
    nan = float("nan")
    labels = torch.tensor([[1.0, 0.0], [nan, nan], [0.0, nan], [nan, nan]])
    sched = Schedule.create("linear", 100)
    opts = {"diffusion_batch": 0, "diffusion_weight": 0.0, "lambda": 1.0, "cls_start": 5, "cls_t_max": 100,
            "kind": "bce", "pos_weight": torch.ones(2)}
    loss, logs = joint_loss(model, _batch(7, 4), latents, labels, sched, opts)
    assert float(loss.detach()) == pytest.approx(float(logs["classification"])) and float(loss.detach()) > 0
    moved = latents.clone()
    moved[1] += 3.0  # unlabelled rows must not matter
    moved[3] -= 2.0
    loss2, _ = joint_loss(model, _batch(7, 4), moved, labels, sched, opts)
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    moved[0] += 1.0  # a labelled row does
    loss3, _ = joint_loss(model, _batch(7, 4), moved, labels, sched, opts)
    assert float(loss3.detach()) != pytest.approx(float(loss.detach()), rel=1e-6)
    # before cls_start the classification term is off
    warm, _ = joint_loss(model, _batch(2, 4), latents, labels, sched, opts)
    assert float(warm.detach()) == 0.0


def test_joint_loss_diffusion_term_uses_only_the_diffusion_rows():
    torch.manual_seed(0)
    model = build_joint(NET, {"hidden": 8, "pool": 1}, 1)
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.1)  # the zero-initialised output layer would hide z
    latents = torch.randn(4, 2, 8, 8)
    labels = torch.full((4, 1), float("nan"))
    sched = Schedule.create("linear", 100)
    opts = {"diffusion_batch": 2, "diffusion_weight": 1.0, "lambda": 0.0, "cls_start": 0, "cls_t_max": 100,
            "kind": "bce", "pos_weight": torch.ones(1)}
    loss, _ = joint_loss(model, _batch(0, 4), latents, labels, sched, opts)
    moved = latents.clone()
    moved[2:] += 4.0  # rows at positions >= diffusion_batch (classification rows)
    assert float(joint_loss(model, _batch(0, 4), moved, labels, sched, opts)[0].detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    moved[0] += 4.0
    assert float(joint_loss(model, _batch(0, 4), moved, labels, sched, opts)[0].detach()) != pytest.approx(float(loss.detach()), rel=1e-6)


def test_joint_batches_draw_labelled_rows_for_the_classification_part():
    labelled = np.array([3, 7])
    draw = joint_batches(10, labelled, 5, 4)
    idx = draw(0, 11, 9)
    assert idx.shape == (9,)
    assert set(idx[5:].tolist()) <= {3, 7}
    assert torch.equal(idx, draw(0, 11, 9)) and not torch.equal(idx, draw(0, 12, 9))
    with pytest.raises(MedcfxError):
        joint_batches(10, np.array([], int), 5, 4)


# ------------------------------------------------------------------------------------------ label subsampling


def _labels(n=500, seed=0):
    rng = np.random.default_rng(seed)
    lab = (rng.random((n, 3)) < 0.3).astype(np.float32)
    lab[rng.random(n) < 0.2] = np.nan  # unlabelled rows
    lab[5, 1] = np.nan  # a partly labelled row
    return lab


def test_label_subsampling_is_reproducible_nested_and_sized():
    lab = _labels()
    labelled = ~np.isnan(lab).all(1)
    n = int(labelled.sum())
    kept_sets = []
    for f in (0.02, 0.05, 0.1, 0.2, 1.0):
        sub = subsample_labels(lab, f, seed=4)
        np.testing.assert_array_equal(sub, subsample_labels(lab, f, seed=4), strict=True)
        kept = ~np.isnan(sub).all(1)
        assert kept.sum() == max(1, round(f * n))
        assert not np.any(kept & ~labelled)  # never invents labels
        np.testing.assert_array_equal(sub[kept], lab[kept])  # kept rows keep every cell (NaN included)
        kept_sets.append(set(np.flatnonzero(kept)))
    for small, big in zip(kept_sets, kept_sets[1:]):
        assert small <= big
    other = ~np.isnan(subsample_labels(lab, 0.1, seed=5)).all(1)
    assert set(np.flatnonzero(other)) != kept_sets[2]
    assert not np.isnan(lab).all() and np.isnan(lab).sum() > 0  # input untouched
    with pytest.raises(UsageError):
        subsample_labels(lab, 0.0)
    with pytest.raises(UsageError):
        subsample_labels(lab, 1.5)
    with pytest.raises(MedcfxError):
        subsample_labels(np.full((3, 2), np.nan), 0.5)


# ------------------------------------------------------------------------------------------ targets and guidance


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(UsageError) as e:
        cf.parse_targets("no-pneumonia", ["cardiomegaly", "effusion"])
    msg = str(e.value)
    assert "no-pneumonia" in msg and "no-cardiomegaly" in msg and "effusion" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="required"):
        cf.parse_targets([], ["cardiomegaly"])
    with pytest.raises(UsageError, match="twice"):
        cf.parse_targets("cardiomegaly,no-cardiomegaly", ["cardiomegaly"])


def test_several_targets_parse_and_sum_their_log_probabilities():
    findings = ["cardiomegaly", "effusion", "nodule"]
    ts = cf.parse_targets("no-cardiomegaly, nodule", findings)
    assert [(t.finding, t.index, t.add) for t in ts] == [("cardiomegaly", 0, False), ("nodule", 2, True)]
    assert cf.parse_targets(["no-effusion"], findings)[0].index == 1
    logits = torch.tensor([[0.3, -1.0, 2.0], [-0.5, 0.1, -1.5]])
    got = cf.target_log_prob("bce", logits, ts, [2.0, 0.5])
    l = logits.numpy().astype(np.float64)
    want = 2.0 * np.log(1 - _sigmoid(l[:, 0])) + 0.5 * np.log(_sigmoid(l[:, 2]))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    p = np.exp(l) / np.exp(l).sum(1, keepdims=True)
    got_ce = cf.target_log_prob("ce", logits, ts, [1.0, 1.0])
    np.testing.assert_allclose(got_ce.numpy(), np.log(1 - p[:, 0]) + np.log(p[:, 2]), rtol=1e-5)


class _HalfX(torch.nn.Module):
    """A fake denoiser: eps = 0.5 x."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        return 0.5 * x + 0 * self.w


class _LinearClassifier:
    """logits_k(z) = <W_k, z> (a stand-in for the joint model: ``unet`` + ``logits``)."""

    def __init__(self, W):
        self.unet = _HalfX()
        self.W = W

    def logits(self, z, t):
        return z.flatten(1) @ self.W.T


@pytest.mark.parametrize("kind", ["bce", "ce"])
def test_guided_noise_prediction_matches_a_hand_computation(kind):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 2 * 4 * 4, generator=g, dtype=torch.float64).float() * 0.3
    model = _LinearClassifier(W)
    sched = Schedule.create("linear", 1000)
    targets = cf.parse_targets("no-a,c", ["a", "b", "c"])
    scales = [500.0, 200.0]
    den = cf.guided_denoiser(model, sched, kind, targets, scales)
    z = torch.randn(2, 2, 4, 4, generator=g)
    t = torch.tensor([300, 120])
    got = den(z, t, {}).numpy().astype(np.float64)
    Wn, zn = W.numpy().astype(np.float64), z.numpy().astype(np.float64).reshape(2, -1)
    ab = sched.alphas_cumprod.numpy()[[300, 120]]
    for b in range(2):
        l = Wn @ zn[b]
        if kind == "bce":  # d log(1 - s(l_a)) = -s(l_a) W_a ; d log s(l_c) = (1 - s(l_c)) W_c
            grad = -500.0 * _sigmoid(l[0]) * Wn[0] + 200.0 * (1 - _sigmoid(l[2])) * Wn[2]
        else:  # d log p_c = W_c - sum p W ; d log(1 - p_a) = -p_a / (1 - p_a) (W_a - sum p W)
            p = np.exp(l - l.max()) / np.exp(l - l.max()).sum()
            mean_w = p @ Wn
            grad = 200.0 * (Wn[2] - mean_w) - 500.0 * p[0] / (1 - p[0]) * (Wn[0] - mean_w)
        want = 0.5 * zn[b] - math.sqrt(1 - ab[b]) * grad
        np.testing.assert_allclose(got[b].reshape(-1), want, rtol=2e-4, atol=1e-4)


def test_zero_scale_is_the_plain_denoiser():
    model = _LinearClassifier(torch.randn(1, 8))
    den = cf.guided_denoiser(model, Schedule.create("linear", 100), "bce", cf.parse_targets("a", ["a"]), [0.0])
    z = torch.randn(1, 2, 2, 2)
    torch.testing.assert_close(den(z, torch.tensor([5]), {}), 0.5 * z)


def test_reverse_chain_grid():
    sched = Schedule.create("linear", 1000)
    g = cf.chain(sched, 300, "all")
    assert g.N == 301 and int(g.timesteps[-1]) == 300 and int(g.timesteps[0]) == 0
    g = cf.chain(sched, 300, 4)
    assert g.timesteps.tolist() == [0, 100, 200, 300]
    assert float(g.abar[-1]) == pytest.approx(float(sched.alphas_cumprod[300]))
    for bad in [(0, 5), (1000, 5), (300, 302), (300, "x")]:
        with pytest.raises(UsageError):
            cf.chain(sched, *bad)


def test_counterfactual_noises_forward_to_t_and_denoises_over_the_chain():
    """With a denoiser that knows the true noise of z_t (eps = (z_t - sqrt(abar) z0) / sqrt(1 - abar)) and
    DDIM steps, the reverse process returns z0 exactly: the start is the forward q_sample at timestep t."""
    sched = Schedule.create("linear", 1000)
    z0 = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x.dtype)
            return (x - a.sqrt() * z0) / (1 - a).sqrt()

    class M:
        unet = Oracle()

    out = cf.counterfactual(M(), sched, z0, "bce", [], [], 300, 7, "ddim", torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, z0)


# ------------------------------------------------------------------------------------------ joint model


def test_encoder_features_are_the_unet_feature_tap():
    torch.manual_seed(0)
    model = build_joint(NET, {"hidden": 8, "pool": 2}, 3)
    z = torch.randn(2, 2, 8, 8)
    t = torch.tensor([3, 50])
    _, feats = model.unet.forward_features(z, t)
    mine = encoder_features(model.unet, z, t)
    assert len(mine) == len(feats) == 3
    for a, b in zip(mine, feats):
        torch.testing.assert_close(a, b)
    eps, logits = model(z, t)
    torch.testing.assert_close(model.logits(z, t), logits)
    assert model.head.net[0].in_features == sum(model.unet.feature_channels()) * 4


def test_head_is_linear_leakyrelu_linear():
    model = build_joint(NET, {"hidden": 8, "pool": 1}, 3)
    layers = [m for m in model.head.net if not isinstance(m, torch.nn.Dropout)]
    assert [type(m).__name__ for m in layers] == ["Linear", "LeakyReLU", "Linear"]
    assert layers[1].negative_slope == 0.2 and layers[2].out_features == 3


def test_choose_pool_respects_the_feature_cap():
    assert choose_pool([32, 64, 64, 64], [16, 8, 4, 4], 10000) == 4  # 224 * 16 = 3584
    assert choose_pool([32, 64, 64, 64], [16, 8, 4, 4], 1024) == 2  # 224 * 4 = 896
    assert choose_pool([256, 512, 1024, 1024], [32, 16, 8, 8], 10000) == 1
    assert choose_pool([32], [16], 10) == 1


# ------------------------------------------------------------------------------------------ autoencoder


def test_kl_term_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    got = float(kl_divergence(mu, logvar))
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = float(torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean())
    assert got == pytest.approx(want, rel=1e-10)
    m, lv = mu.numpy(), logvar.numpy()
    by_hand = np.mean([np.sum(np.log(1 / np.exp(0.5 * lv[b])) + (np.exp(lv[b]) + m[b] ** 2) / 2 - 0.5) for b in range(3)])
    assert got == pytest.approx(by_hand, rel=1e-10)
    assert float(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3))) == 0.0


def test_ssim_matches_a_brute_force_window_computation():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 14, 13, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(1, 1, 14, 13, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = float(ssim(a, b, data_range=1.0))
    r = np.arange(11) - 5.0
    w1 = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(w1, w1) / w1.sum() ** 2
    A, B = a[0, 0].numpy(), b[0, 0].numpy()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(14 - 10):
        for j in range(13 - 10):
            pa, pb = A[i:i + 11, j:j + 11], B[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    assert got == pytest.approx(float(np.mean(vals)), rel=1e-5)
    assert float(ssim(a, a, data_range=1.0)) == pytest.approx(1.0)


def test_autoencoder_shapes_and_downsampling_factor():
    cfg = AEConfig(in_channels=1, latent_channels=3, base_channels=8, channel_mult=(1, 2, 2), num_groups=4)
    ae = KLAutoencoder(cfg)
    x = torch.randn(2, 1, 16, 16)
    rec, mu, logvar = ae(x)
    assert cfg.factor == 4 and mu.shape == (2, 3, 4, 4) and rec.shape == x.shape
    with pytest.raises(UsageError, match="channel"):
        ae.check_input(torch.randn(1, 3, 16, 16))
    with pytest.raises(UsageError, match="multiples"):
        ae.check_input(torch.randn(1, 1, 18, 18))
    with pytest.raises(UsageError):
        AEConfig.from_dict({"in_channels": 1, "latent": 4})


def test_adversarial_terms_move_only_their_own_network():
    torch.manual_seed(0)
    cfg = AEConfig(in_channels=1, latent_channels=2, base_channels=8, channel_mult=(1, 2), num_groups=4)
    module = AETrainModule(KLAutoencoder(cfg), PatchDiscriminator(1, 8, 4))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    w = {"l1": 0.0, "ssim": 0.0, "kl": 0.0, "adv": 1.0}
    loss, logs = ae_loss(module, x, torch.zeros(2, 2, 8, 8), w, adversarial=True)
    loss.backward()
    # the discriminator's gradient comes from its hinge loss alone
    d_only = torch.nn.functional.relu(1 - module.disc(x)).mean() + torch.nn.functional.relu(1 + module.disc(module.ae(x)[0].detach())).mean()
    grads = torch.autograd.grad(d_only, list(module.disc.parameters()))
    for p, gd in zip(module.disc.parameters(), grads):
        torch.testing.assert_close(p.grad, gd)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.ae.decoder.parameters())
    assert set(logs) >= {"g_adv", "d_hinge"}


def test_presets_resolve_to_valid_architectures():
    from medcfx import config as cfgmod
    from medcfx.nn.unet import UNetConfig
    from medcfx_mediffusion.methods import AE_DEFAULTS, AE_PRESETS, DEFAULTS, PRESETS

    for name in ("demo", "paper"):
        ae = cfgmod.resolve(AE_DEFAULTS, AE_PRESETS[name])
        ae_cfg = AEConfig.from_dict({**ae["network"], "in_channels": 1})
        latent = ae["preprocess"]["size"] // ae_cfg.factor
        net = cfgmod.resolve(DEFAULTS, PRESETS[name])["network"]
        UNetConfig.from_dict({**net, "in_channels": ae_cfg.latent_channels, "out_channels": ae_cfg.latent_channels,
                              "image_size": latent})
    assert latent == 32  # the paper's 256 px -> 32 x 32 x 4 latents
