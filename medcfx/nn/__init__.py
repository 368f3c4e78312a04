"""Neural networks: one ADM-style UNet with conditioning slots, its half-UNet encoder, FLOP counting."""

from medcfx.nn.flops import count_flops
from medcfx.nn.unet import HalfUNetConfig, HalfUNetEncoder, UNet, UNetConfig, UNetForExport

__all__ = ["HalfUNetConfig", "HalfUNetEncoder", "UNet", "UNetConfig", "UNetForExport", "count_flops"]
