"""The restoration plugin's maths: SSIM anomaly maps, the 20% no-task draw, the weighted loss, DDPM
restoration conditioned on the image, and ensemble averaging.

Independent references: an SSIM computed with explicit loops over each window, scipy's Gaussian filter,
an oracle denoiser whose answer is known in closed form, and binomial counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medcfx.anomalies import fold_tasks
from medcfx.diffusion import Schedule, TorchDenoiser
from medcfx.errors import UsageError
from medcfx.nn import UNet
from medcfx.registry import Registry
from medcfx.train import Batch, generator
from medcfx_restoration.infer import (
    METHOD,
    Mapper,
    Member,
    Params,
    load_members,
    register_ensemble,
    restore,
    split_refs,
)
from medcfx_restoration.maps import anomaly_map, ssim_map
from medcfx_restoration.train import plan, split_cases, weighted_eps_loss

# ------------------------------------------------------------------------------------------------ SSIM


def ssim_loops(x: np.ndarray, y: np.ndarray, L: float, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """SSIM at every pixel by explicit loops over its window (reflect padding without the edge pixel)."""
    r = size // 2
    d = np.arange(-r, r + 1)
    g = np.exp(-d ** 2 / (2 * sigma ** 2))
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    xp, yp = np.pad(x, r, mode="reflect"), np.pad(y, r, mode="reflect")
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            mx = my = sxx = syy = sxy = 0.0
            for a in range(size):
                for b in range(size):
                    wa = w2[a, b]
                    mx += wa * xp[i + a, j + b]
                    my += wa * yp[i + a, j + b]
            for a in range(size):
                for b in range(size):
                    wa = w2[a, b]
                    sxx += wa * (xp[i + a, j + b] - mx) ** 2
                    syy += wa * (yp[i + a, j + b] - my) ** 2
                    sxy += wa * (xp[i + a, j + b] - mx) * (yp[i + a, j + b] - my)
            out[i, j] = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return out


def test_ssim_map_matches_an_explicit_window_loop_with_the_data_range_constants():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (7, 9))
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    ours = ssim_map(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None], data_range=2.0)[0, 0].numpy()
    np.testing.assert_allclose(ours, ssim_loops(x, y, L=2.0), atol=1e-12)
    # the constants matter: the authors' code's range of 255 gives a different (much higher) map
    other = ssim_map(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None], data_range=255.0)[0, 0]
    assert float((other.numpy() - ours).mean()) > 0.05


def test_ssim_map_matches_the_gaussian_filter_formula():
    rng = np.random.default_rng(1)
    x = ndimage.gaussian_filter(rng.normal(size=(2, 3, 30, 26)), (0, 0, 1, 1))
    y = x + rng.normal(0, 0.2, x.shape)

    def blur(a):  # 11 taps (radius int(3.5 * 1.5 + 0.5) = 5), 'mirror' = reflect without the edge pixel
        return ndimage.gaussian_filter(a, (0, 0, 1.5, 1.5), mode="mirror", truncate=3.5)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.02 ** 2, 0.06 ** 2
    ref = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    ours = ssim_map(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_anomaly_map_is_the_channel_mean_of_one_minus_ssim_and_zero_in_the_background():
    rng = np.random.default_rng(2)
    x = np.full((2, 2, 24, 24), -1.0)
    x[:, :, 4:20, 6:18] = rng.uniform(-0.5, 1, (2, 2, 16, 12))
    r = np.clip(x + rng.normal(0, 0.1, x.shape), -1, 1)
    xt, rt = torch.from_numpy(x), torch.from_numpy(r)
    m = anomaly_map(xt, rt).numpy()
    per_channel = 1 - ssim_map(rt, xt).numpy()
    fg = np.zeros((24, 24), bool)
    fg[4:20, 6:18] = True
    np.testing.assert_allclose(m[:, fg], per_channel.mean(1)[:, fg], atol=1e-6)
    assert np.all(m[:, ~fg] == 0)
    assert np.abs(anomaly_map(xt, xt).numpy()).max() < 1e-6  # a perfect restoration gives an empty map
    res = anomaly_map(xt, rt, "residual").numpy()
    np.testing.assert_allclose(res[:, fg], np.abs(x - r).mean(1)[:, fg], atol=1e-6)
    with pytest.raises(UsageError, match="--map"):
        anomaly_map(xt, rt, "l2")


# ------------------------------------------------------------------------------------------------ training draws


def test_one_sample_in_five_gets_no_task_and_only_training_tasks_are_used():
    train, val = fold_tasks(3)
    draws = []
    for step in range(60):
        batch = Batch(step=step, seed=7, indices=torch.arange(32), positions=torch.arange(32))
        draws += plan(batch, train, 0.2)
    n = len(draws)
    none = sum(t is None for t, _ in draws)
    sd = math.sqrt(n * 0.2 * 0.8)
    assert abs(none - 0.2 * n) < 4 * sd
    used = [t for t, _ in draws if t is not None]
    assert set(used) == set(train) and not set(used) & set(val)
    for t in train:  # uniform over the three training tasks
        assert abs(used.count(t) - len(used) / 3) < 4 * math.sqrt(len(used) * 2 / 9)
    # the same step and positions give the same plan (per-sample generators), another step does not
    b = Batch(step=5, seed=7, indices=torch.arange(32), positions=torch.arange(32))
    assert plan(b, train, 0.2) == draws[5 * 32:6 * 32]
    assert plan(b, train, 0.2) != draws[6 * 32:7 * 32]


def test_weighted_loss_is_min_snr_weighted_mse():
    schedule = Schedule.create("linear", 1000)

    class Const(torch.nn.Module):
        def forward(self, x, t, cond_image=None):
            return torch.zeros_like(x) + 0.5

    x0 = torch.randn(3, 1, 8, 8)
    noise = torch.randn(3, 1, 8, 8)
    t = torch.tensor([5, 300, 900])
    got = weighted_eps_loss(Const(), x0, {}, t, noise, schedule, snr_gamma=1.0)
    abar = schedule.alphas_cumprod[t].numpy()
    snr = abar / (1 - abar)
    w = np.minimum(snr, 1.0) / snr
    mse = ((0.5 - noise.numpy()) ** 2).reshape(3, -1).mean(1)
    assert abs(float(got) - float((w * mse).mean())) < 1e-5
    plain = weighted_eps_loss(Const(), x0, {}, t, noise, schedule, snr_gamma=0.0)
    assert abs(float(plain) - float(mse.mean())) < 1e-5


def test_split_cases_holds_out_whole_cases():
    cases = [f"c{i}" for i in range(10)]
    tr, va = split_cases(cases, 0.2, seed=0)
    assert len(va) == 2 and not tr & va and tr | va == set(cases)
    assert split_cases(cases, 0.2, seed=0) == (tr, va)
    assert split_cases(["only"], 0.5, 0) == ({"only"}, set())


# ------------------------------------------------------------------------------------------------ sampling


class Oracle(torch.nn.Module):
    """eps that makes x0_hat equal the conditioning image exactly: eps = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t)."""

    def __init__(self, schedule: Schedule):
        super().__init__()
        self.abar = schedule.alphas_cumprod.float()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, cond_image=None):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * cond_image) / (1 - a).sqrt()


def test_ddpm_restoration_is_conditioned_on_the_input_at_every_step():
    schedule = Schedule.create("linear", 1000)
    seen = []

    class Spy(Oracle):
        def forward(self, x, t, cond_image=None):
            seen.append(int(t[0]))
            return super().forward(x, t, cond_image)

    spy = Spy(schedule)
    member = Member(entry=None, role="weights", ref="oracle", model=spy, schedule=schedule, fold=None,
                    denoiser=TorchDenoiser(spy))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = restore(member, x, Params(steps=10), torch.Generator().manual_seed(0), METHOD)
    # every x0 estimate is the input, so the ancestral chain ends exactly there (last step has no noise)
    np.testing.assert_allclose(out.numpy(), x.numpy(), atol=1e-4)
    assert seen == list(range(900, -1, -100))  # from pure noise over the whole grid "ddim10"


class TargetOracle(torch.nn.Module):
    """An unconditional denoiser whose x0 estimate is always the fixed image ``target``."""

    def __init__(self, schedule: Schedule, target: torch.Tensor):
        super().__init__()
        self.abar = schedule.alphas_cumprod.float()
        self.target = target
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, cond_image=None):
        assert cond_image is None  # the baseline is unconditional
        a = self.abar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


def test_baseline_noises_to_a_level_and_denoises_unconditionally():
    schedule = Schedule.create("linear", 1000)
    target = torch.rand(2, 1, 16, 16) * 2 - 1
    seen = []

    class Spy(TargetOracle):
        def forward(self, x, t, cond_image=None):
            seen.append(int(t[0]))
            return super().forward(x, t, cond_image)

    spy = Spy(schedule, target)
    member = Member(None, "weights", "oracle", spy, schedule, None, TorchDenoiser(spy))
    x = torch.zeros(2, 1, 16, 16)
    out = restore(member, x, Params(steps=10, noise_level=0.5), torch.Generator().manual_seed(0), "recon-ddpm")
    np.testing.assert_allclose(out.numpy(), target.numpy(), atol=1e-4)
    # level round(0.5 * 10) = 5 of the grid ddim10 (0, 100, ..., 900): steps at t = 400, 300, ..., 0
    assert seen == [400, 300, 200, 100, 0]


def tiny_unet(conditional: bool, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = {"in_channels": 1, "out_channels": 1, "image_size": 16, "model_channels": 8, "channel_mult": [1, 2],
           "num_res_blocks": 1, "attention_resolutions": [8], "dropout": 0.0, "num_head_channels": 8,
           "num_groups": 4, "cond_image_channels": 1 if conditional else 0}
    net = UNet(cfg)
    with torch.no_grad():  # make the zero-initialised output layer non-trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {"config": cfg, "state": {k: v.contiguous() for k, v in net.state_dict().items()}}


def register_tiny(reg: Registry, tmp_path, name: str, seed: int, fold: int = 0, size: int = 16, intensity=None):
    from safetensors.torch import save_file

    m = tiny_unet(True, seed)
    path = tmp_path / f"{name}.safetensors"
    save_file(m["state"], str(path))
    config = {"network": m["config"], "diffusion": {"schedule": "linear", "T": 100}, "fold": fold,
              "preprocess": {"size": size, "modalities": ["t2"], **({"intensity": intensity} if intensity else {})},
              "explain": {}}
    return reg.register(name, METHOD, {"weights": path}, config=config)


def test_members_differing_only_in_the_2d_rule_explain_volumes_and_refuse_2d_images(tmp_path):
    """A model of an older medcfx records the 2D scaling rule 'legacy'; volumes ignore the rule, so it ensembles
    with a new model for volumes, and a 2D image (which each would scale its own way) is refused by name."""
    import nibabel as nib
    from PIL import Image

    from medcfx.data.preprocess import PreprocessConfig
    from medcfx.errors import MedcfxError
    from medcfx.inputs import iter_cases

    reg = Registry(tmp_path / "home", bundled=False)
    register_tiny(reg, tmp_path, "old", 1, 0, intensity="legacy")
    register_tiny(reg, tmp_path, "new", 2, 1, intensity="percentile")
    members, pre = load_members(reg, ["old", "new"], METHOD, "cpu")
    assert register_ensemble(reg, ["old", "new"], "ens").config["preprocess"] == pre
    vol, png = tmp_path / "case.nii.gz", tmp_path / "image.png"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(1, 100, (20, 20, 4)).astype(np.float32), np.eye(4)), str(vol))
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(png)
    cfg = PreprocessConfig.from_dict(pre)
    for mixed in (members, [members[0], members[0]]):
        mapper = Mapper(mixed, Params(steps=2), seed=0, method=METHOD)
        case = next(iter_cases(vol, cfg, 1))
        assert mapper.check_case(case) is case
        image = next(iter_cases(png, cfg, 1))
        if mixed is members:
            with pytest.raises(MedcfxError, match=r"image\.png: .*different rules \(legacy, percentile\)"):
                mapper.check_case(image)
        else:
            assert mapper.check_case(image) is image


def test_ensemble_maps_are_the_mean_of_the_members_maps(tmp_path):
    reg = Registry(tmp_path / "home", bundled=False)
    a = register_tiny(reg, tmp_path, "fold-a", 1, 0)
    b = register_tiny(reg, tmp_path, "fold-b", 2, 1)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    x[:, :, :3] = -1  # some background
    params = Params(steps=4)
    members, pre = load_members(reg, split_refs("fold-a, fold-b", METHOD), METHOD, "cpu")
    assert [m.ref for m in members] == [a.ref, b.ref] and pre["size"] == 16
    _, both = Mapper(members, params, seed=3, method=METHOD)(x, start=0)
    each = [anomaly_map(x, restore(m, x, params, generator(3, k, 0), METHOD)) for k, m in enumerate(members)]
    np.testing.assert_allclose(both.numpy(), ((each[0] + each[1]) / 2).numpy(), atol=1e-6)
    assert not torch.allclose(each[0], each[1])  # two different models: averaging is not a no-op
    # a registered ensemble entry holds both weights and gives the same maps
    ens = register_ensemble(reg, [a.ref, b.ref], "ens")
    assert set(ens.artifacts) == {"weights", "member1"} and [m["fold"] for m in ens.config["ensemble"]] == [0, 1]
    members2, _ = load_members(reg, ["ens"], METHOD, "cpu")
    _, both2 = Mapper(members2, params, seed=3, method=METHOD)(x, start=0)
    np.testing.assert_allclose(both2.numpy(), both.numpy(), atol=1e-6)


def test_samples_average_that_many_restorations_of_each_model(tmp_path):
    """--samples K: the mean of K maps per model, each from its own noise stream; one model with K samples maps as
    the ensemble of K copies of it, and K = 1 is the single map."""
    reg = Registry(tmp_path / "home", bundled=False)
    register_tiny(reg, tmp_path, "one", 1)
    members, _ = load_members(reg, ["one"], METHOD, "cpu")
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    each = [anomaly_map(x, restore(members[0], x, Params(steps=3), generator(5, j, 4), METHOD)) for j in range(3)]
    _, three = Mapper(members, Params(steps=3, samples=3), seed=5, method=METHOD)(x, start=4)
    np.testing.assert_allclose(three.numpy(), (sum(each) / 3).numpy(), atol=1e-6)
    _, copies = Mapper(members * 3, Params(steps=3), seed=5, method=METHOD)(x, start=4)
    np.testing.assert_allclose(copies.numpy(), three.numpy(), atol=1e-6)
    _, single = Mapper(members, Params(steps=3), seed=5, method=METHOD)(x, start=4)
    np.testing.assert_allclose(single.numpy(), each[0].numpy(), atol=1e-6)
    assert not torch.allclose(each[0], each[1])  # its own noise: averaging is not a no-op
    with pytest.raises(UsageError, match="--samples"):
        Params(samples=0).check()


def test_models_of_another_method_or_preprocessing_are_refused(tmp_path):
    from safetensors.torch import save_file

    reg = Registry(tmp_path / "home", bundled=False)
    register_tiny(reg, tmp_path, "ok", 1)
    m = tiny_unet(False, 3)
    save_file(m["state"], str(tmp_path / "u.safetensors"))
    reg.register("other", "sanchez", {"weights": tmp_path / "u.safetensors"}, config={"network": m["config"]})
    with pytest.raises(UsageError, match="method 'sanchez'"):
        load_members(reg, ["ok", "other"], METHOD, "cpu")
    register_tiny(reg, tmp_path, "at32", 4, size=32)
    with pytest.raises(UsageError, match="preprocessing"):
        load_members(reg, ["ok", "at32"], METHOD, "cpu")
    with pytest.raises(UsageError, match="preprocessing"):
        register_ensemble(reg, ["ok", "at32"], "mixed")
    with pytest.raises(UsageError, match="at least two"):
        register_ensemble(reg, ["ok"], "alone")
    with pytest.raises(UsageError, match="needs --model"):
        split_refs(None, METHOD)
    with pytest.raises(UsageError, match="one --model"):
        split_refs("a,b", "recon-ddpm")
