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
