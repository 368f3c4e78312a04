import pytest

from medcfx.config import deep_merge, parse_set, resolve
from medcfx.errors import UsageError

DEFAULTS = {"train": {"steps": 10, "lr": 1e-4}, "network": {"channel_mult": [1, 2]}, "name": "x"}


def test_parse_set_nests_and_parses_yaml_values():
    assert parse_set(["train.steps=5", "network.channel_mult=[1,2,4]", "name=abc", "train.lr=3e-4"]) == {
        "train": {"steps": 5, "lr": 3e-4}, "network": {"channel_mult": [1, 2, 4]}, "name": "abc"}


def test_resolve_layers_override_in_order_and_keep_defaults_intact():
    cfg = resolve(DEFAULTS, {"train": {"steps": 20}}, parse_set(["train.steps=30"]))
    assert cfg["train"] == {"steps": 30, "lr": 1e-4}
    assert DEFAULTS["train"]["steps"] == 10
    assert deep_merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


@pytest.mark.parametrize("bad", [["train.stpes=3"], ["nope=1"], ["train..x=1"], ["novalue"]])
def test_typos_and_malformed_overrides_are_refused(bad):
    with pytest.raises(UsageError):
        resolve(DEFAULTS, parse_set(bad))


TYPED = {"train": {"steps": 100, "lr": 1.0e-4, "ema_warmup": True, "batch_size": 8},
            "explain": {"guidance": 3.0, "steps": "all", "t": None, "grades": [0, 1]},
            "grader": {"svm_C": "cv"}}


@pytest.mark.parametrize("item, message", [
    ("train.steps=abc", "'train.steps' must be an integer"),
    ("train.steps=2.5", "'train.steps' must be an integer"),
    ("train.steps=null", "'train.steps' must be an integer"),
    ("train=5", "'train' must be a mapping"),
    ("train.lr=fast", "'train.lr' must be a finite number"),
    ("train.lr=.nan", "'train.lr' must be a finite number"),
    ("train.lr=.inf", "'train.lr' must be a finite number"),
    ("train.ema_warmup=2", "'train.ema_warmup' must be true or false"),
    ("explain.guidance=[1,2]", "'explain.guidance' must be a finite number"),
    ("explain.grades=3", "'explain.grades' must be a list"),
    ("explain.steps=[1]", "'explain.steps' must be a string or a finite number"),
])
def test_set_values_are_checked_against_the_type_of_their_default(item, message):
    with pytest.raises(UsageError, match=message):
        resolve(TYPED, parse_set([item]))


def test_set_values_of_the_right_kind_pass():
    got = resolve(TYPED, parse_set(["train.steps=7", "train.lr=1", "explain.steps=50", "explain.t=300",
                                       "grader.svm_C=0.01", "explain.guidance=2e-1"]))
    assert got["train"]["steps"] == 7 and got["train"]["lr"] == 1 and got["explain"]["steps"] == 50
    assert got["explain"]["t"] == 300 and got["grader"]["svm_C"] == 0.01 and got["explain"]["guidance"] == 0.2


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN"])
def test_float_options_must_be_finite(raw):
    from medcfx.method import Option

    with pytest.raises(UsageError, match="--guidance must be a finite number"):
        Option("guidance", float, 3.0, "CFG scale").convert(raw)
    assert Option("guidance", float, 3.0, "CFG scale").convert("2.5") == 2.5


def test_cli_refuses_non_finite_guidance_and_mistyped_set_before_any_work(tmp_path, home):
    from conftest import ROOT, cli_env, run_cli

    case = ROOT / "models" / "demo-inputs" / "brain" / "demo_case"
    env = cli_env(home)
    for args, message in ((["--guidance", "nan"], "--guidance must be a finite number"),
                          (["--set", "explain.steps=abc"], "config key 'explain.steps' must be an integer")):
        r = run_cli(["explain", case, "--model", "sanchez-demo", *args, "--out", tmp_path / "o"], env=env)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_layer_choosing_one_head_rule_clears_the_other():
    """The sanchez paper preset gives its heads as num_heads = 1 (the authors' single head); a user layer that
    sets num_head_channels switches to that rule (num_heads -> 0) instead of failing as "both set", and a
    layer that sets both keeps both (the UNet config then refuses them)."""
    from medcfx.nn.blocks import AttentionBlock
    from medcfx.nn.unet import UNet, UNetConfig
    from medcfx_sanchez import methods as sanchez_methods

    defaults = dict(next(m for m in sanchez_methods.methods() if m.name == "sanchez").defaults)
    presets = defaults.pop("presets")
    paper = resolve(defaults, presets["paper"])["network"]
    assert (paper["num_heads"], paper["num_head_channels"]) == (1, 0)
    heads = {b.num_heads for b in UNet(UNetConfig.from_dict(paper)).modules() if isinstance(b, AttentionBlock)}
    assert heads == {1}
    demo = resolve(defaults, presets["demo"])["network"]
    assert (demo["num_heads"], demo["num_head_channels"]) == (0, 32)  # unchanged: 32-channel heads
    user = resolve(defaults, presets["paper"], {"network": {"num_head_channels": 32}})["network"]
    assert (user["num_heads"], user["num_head_channels"]) == (0, 32)
    user = resolve(defaults, presets["demo"], {"network": {"num_heads": 2}})["network"]
    assert (user["num_heads"], user["num_head_channels"]) == (2, 0)
    both = resolve(defaults, {"network": {"num_heads": 2, "num_head_channels": 32}})["network"]
    with pytest.raises(UsageError, match="exactly one"):
        UNetConfig.from_dict(both)
