"""Loading registered models: every artifact is sha256-verified by the registry before it is read."""

from __future__ import annotations

from medcfx.errors import MedcfxError


def load_unet(registry, ref: str, role: str = "weights", network_key: str = "network", device: str = "cpu"):
    """Build the UNet described by an entry's ``config[network_key]`` and load its verified weights.

    Returns ``(model, entry)`` with the model in eval mode.
    """
    from medcfx.nn import UNet

    entry = registry.resolve(ref)
    net_cfg = entry.config.get(network_key)
    if net_cfg is None:
        raise MedcfxError(f"model {entry.ref} has no '{network_key}' config: it is not a UNet model")
    model = UNet.from_config(net_cfg)
    load_state(model, registry.load_tensors(entry, role), f"{entry.ref} ({role})")
    return model.to(device).eval(), entry


def load_state(module, tensors: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error when the weights do not fit the network."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MedcfxError(f"weights of {what} do not fit its network config: {first}") from None
