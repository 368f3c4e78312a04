"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode``.

Counted: convolutions, linear layers (mm/addmm), matmuls/bmm and scaled-dot-product attention, each as
2 x multiply-adds (so a Linear(in, out) on a batch of B costs 2*B*in*out, a Conv2d 2*in*out*k*k*H_out*W_out
per sample). Not counted: bias additions, normalisation, activations, softmax, elementwise ops.

PyTorch's counter has no formula for the CPU flash-attention kernel that
``scaled_dot_product_attention`` dispatches to on CPU; it is added here with the same formula used for the
GPU kernels (QK^T and AV products: 2*B*heads*L_q*L_kv*(d_qk + d_v)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter


def _custom_mapping() -> dict:
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:

        def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

        mapping[cpu_sdpa] = cpu_sdpa_flop
    return mapping


def count_flops(module: nn.Module, example_inputs: Any) -> int:
    """FLOPs (2 x multiply-adds) of one forward ``module(*example_inputs)`` under ``torch.no_grad``.

    ``example_inputs`` is a tuple/list of positional inputs or a single tensor. The module's train/eval
    mode is left as it is (dropout does not change the count).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with torch.no_grad(), counter:
        module(*example_inputs)
    return int(counter.get_total_flops())
