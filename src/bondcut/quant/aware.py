"""Quantization-aware healing: weights trained through the int8/int4 rounding that packing will apply.

Healing float cores and packing them afterwards gives back much of what healing won: the rounding error lands on
a model that never saw it. Here every forward of a trained core (and, when everything trains, of every weight
``bondcut quantize`` would pack) uses the values packing will store (the same
group ranges, :func:`~.packing.fit_ranges`, and codes, :func:`~.packing.codes_for`, as
:func:`~.packing.quantize`), while gradients pass straight through the rounding to the float cores (the
straight-through estimator of Bengio et al. 2013, as in LLM-QAT and EfficientQAT). Packing when training ends
(:func:`pack_quant_aware`) then stores exactly what was trained: the packing step loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..mpo_linear import MPOLinear
from ..surgery import dense_weight, is_dense_layer, set_submodule
from .memo import VersionMemo
from .modules import QuantMPOLinear
from .packing import check_bits, codes_for, fit_ranges, group_dividing, quantize, row_group, weight_groups


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded values, bit for bit; backward: the gradient, unchanged, to the float weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        return rounded

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def rounded_values(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` as packing and unpacking it would return it (no gradient): the same groups, ranges and codes."""
    with torch.no_grad():
        groups = weight_groups(weight, group_size)  # (G, g), as quantize cuts them
        scale, offset = fit_ranges(groups, bits)
        scale, offset = scale.float()[:, None], offset.float()[:, None]
        values = codes_for(groups, scale, offset, bits) * scale + offset  # what dequantize computes
        return values.view(-1)[: weight.numel()].view(weight.shape).to(weight.dtype)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` as packing and unpacking it would return it, with the gradient of the identity."""
    return _StraightThrough.apply(weight, rounded_values(weight, bits, group_size))


class FakeQuantized(nn.Module):
    """A parametrization: the tensor seen through its ``bits``-bit group-wise rounding (straight-through).
    ``transposed`` rounds the transpose (a GPT-2 ``Conv1D`` stores W as (in, out); packing rounds (out, in)).

    The rounded values are computed once per version of the float tensor (an optimizer step changes it in place),
    so micro-batches of one step share one rounding; only the straight-through node is new per forward, and it
    saves nothing, so other parametrizations (a packed layer's trained scales) keep their own graphs."""

    def __init__(self, bits: int, group_size: int, transposed: bool = False):
        super().__init__()
        check_bits(bits, group_size)
        self.bits, self.group_size, self.transposed = bits, group_size, transposed
        self._rounded: VersionMemo[torch.Tensor] = VersionMemo()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(weight, self._rounded.get((weight,), lambda: self._round(weight)))

    def _round(self, weight: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return rounded_values(weight.t(), self.bits, self.group_size).t()
        return rounded_values(weight, self.bits, self.group_size)


def make_quant_aware(model: nn.Module, bits: int | Mapping[str, int], group_size: int, rest: bool = False) -> int:
    """Parametrize every MPO core of ``model`` with :class:`FakeQuantized` and, with ``rest``, every weight that
    ``bondcut quantize`` would pack (dense Linear layers, the token embedding, the LM head, tied or not), each on the
    grid packing will use. ``bits`` may map MPO layer names to widths (a joint plan's): the cores of layers it
    does not name stay float. The float tensors stay the trained parameters (same objects, now
    ``...parametrizations.<name>.original``). Returns the number of tensors parametrized."""
    widths = bits if isinstance(bits, Mapping) else None
    for width in widths.values() if widths is not None else (bits,):
        check_bits(width, group_size)
    count = 0
    for name, module in model.named_modules():
        width = bits if widths is None else widths.get(name)
        if isinstance(module, MPOLinear) and width:
            module.cache_inference = False  # its cache keys on core storage, and a parametrized core is new each time
            for index in range(len(module.cores)):
                parametrize.register_parametrization(module.cores, str(index), FakeQuantized(width, group_size))
                count += 1
    if rest:
        if widths is not None:
            raise ValueError("rounding the rest needs one width for it: pass bits as an int with rest=True")
        count += _make_rest_quant_aware(model, bits, group_size)
    if not count:
        raise ValueError("quantization-aware healing needs MPO cores (compress the model first) or, with "
                         "train='all', dense layers to round")  # fmt: skip
    return count


def _make_rest_quant_aware(model: nn.Module, bits: int, group_size: int) -> int:
    """The dense Linear layers, embedding and head, each with the group size :func:`.apply.quantize_model` uses."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    dense = [m for m in model.modules() if is_dense_layer(m) and m is not head]
    for module in dense:
        grid = FakeQuantized(
            bits, row_group(group_size, dense_weight(module).shape[1]), not isinstance(module, nn.Linear)
        )
        parametrize.register_parametrization(module, "weight", grid)
    count = len(dense)
    if isinstance(embedding, nn.Embedding):
        width = embedding.weight.shape[1]
        grid = group_dividing(width, row_group(group_size, width), bits)
        tied = head is not None and head.weight is embedding.weight
        parametrize.register_parametrization(embedding, "weight", FakeQuantized(bits, grid))
        count += 1
        if tied:  # the head still holds the float table: round it on the embedding's grid (one parameter, shared)
            parametrize.register_parametrization(head, "weight", FakeQuantized(bits, grid))
            return count + 1
    if head is not None and is_dense_layer(head):
        width = dense_weight(head).shape[1]
        parametrize.register_parametrization(head, "weight", FakeQuantized(bits, row_group(group_size, width)))
        count += 1
    return count


def pack_quant_aware(model: nn.Module, bits: int | None = None, group_size: int = 64) -> None:
    """End quantization-aware training: drop the parametrizations and pack every rounded tensor on the grid it
    trained on (each core at its own parametrization's width and group; the rest, if it was rounded, at ``bits``
    and ``group_size``, round to nearest on the same ranges), so the packed model computes what the trained one
    did."""
    rounded_rest = False
    grids: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        holder = module.cores if isinstance(module, MPOLinear) else module
        if not parametrize.is_parametrized(holder):
            continue
        for tensor in list(holder.parametrizations):
            grid = holder.parametrizations[tensor][0]
            if isinstance(grid, FakeQuantized):
                parametrize.remove_parametrizations(holder, tensor, leave_parametrized=False)
                rounded_rest |= holder is module
                if holder is not module:
                    grids[name] = (grid.bits, grid.group_size)
    for name, module in list(model.named_modules()):
        if name in grids:
            width, group = grids[name]
            packed = [quantize(core.detach(), width, group) for core in module.cores]
            set_submodule(model, name, QuantMPOLinear.from_layer(module, packed))
    if rounded_rest:
        if bits is None:
            raise ValueError("the dense layers were rounded too: pass the width they trained at")
        from .apply import QuantizeConfig, quantize_model

        quantize_model(model, QuantizeConfig(bits=bits, group_size=group_size, cores=False, method="rtn"))
