"""Quantization-aware healing: MPO cores trained through the int8/int4 rounding that packing will apply.

Healing float cores and packing them afterwards gives back much of what healing won: the rounding error lands on
a model that never saw it. Here every forward of a trained core uses the values packing will store (the same
group ranges, :func:`~.packing.fit_ranges`, and codes, :func:`~.packing.codes_for`, as
:func:`~.packing.quantize`), while gradients pass straight through the rounding to the float cores (the
straight-through estimator of Bengio et al. 2013, as in LLM-QAT and EfficientQAT). Packing the cores when training
ends (:func:`pack_quant_aware_cores`) then stores exactly what was trained: the packing step loses nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..mpo_linear import MPOLinear
from ..surgery import set_submodule
from .modules import QuantMPOLinear
from .packing import check_bits, codes_for, fit_ranges, quantize


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded values, bit for bit; backward: the gradient, unchanged, to the float weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        return rounded

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` as packing and unpacking it would return it, with the gradient of the identity."""
    with torch.no_grad():
        flat = weight.detach().reshape(-1).float()
        padded = math.ceil(flat.numel() / group_size) * group_size
        groups = torch.nn.functional.pad(flat, (0, padded - flat.numel())).view(-1, group_size)  # (G, g)
        scale, offset = fit_ranges(groups, bits)
        scale, offset = scale.float()[:, None], offset.float()[:, None]
        values = codes_for(groups, scale, offset, bits) * scale + offset  # what dequantize computes
        values = values.view(-1)[: flat.numel()].view(weight.shape).to(weight.dtype)
    return _StraightThrough.apply(weight, values)


class FakeQuantized(nn.Module):
    """A parametrization: the tensor seen through its ``bits``-bit group-wise rounding (straight-through)."""

    def __init__(self, bits: int, group_size: int):
        super().__init__()
        check_bits(bits, group_size)
        self.bits, self.group_size = bits, group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.bits, self.group_size)


def make_cores_quant_aware(model: nn.Module, bits: int, group_size: int) -> int:
    """Parametrize every MPO core of ``model`` with :class:`FakeQuantized`; the float cores stay the trained
    parameters (same objects, now ``cores.parametrizations.<i>.original``). Returns the number of cores."""
    check_bits(bits, group_size)
    count = 0
    for module in model.modules():
        if isinstance(module, MPOLinear):
            module.cache_inference = False  # its cache keys on core storage, and a parametrized core is new each time
            for index in range(len(module.cores)):
                parametrize.register_parametrization(module.cores, str(index), FakeQuantized(bits, group_size))
                count += 1
    if not count:
        raise ValueError("quantization-aware healing trains MPO cores, and this model has none: compress it first")
    return count


def pack_quant_aware_cores(model: nn.Module, bits: int, group_size: int) -> None:
    """End quantization-aware training: drop the parametrizations and pack every MPO layer's float cores on the grid
    they trained on (the same ranges, round to nearest), so the packed model computes what the trained one did."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, MPOLinear):
            continue
        if parametrize.is_parametrized(module.cores):
            for index in range(len(module.cores)):
                parametrize.remove_parametrizations(module.cores, str(index), leave_parametrized=False)
        packed = [quantize(core.detach(), bits, group_size) for core in module.cores]
        set_submodule(model, name, QuantMPOLinear.from_layer(module, packed))
