"""Fast CPU inference for packed weights: PyTorch's int4 and int8 matmul kernels instead of dequantizing.

Dequantizing a packed weight on every call costs far more than the matmul at decode time (one token: a
576 x 49,152 tied head took ~0.2 s that way). Two ATen CPU kernels multiply by the codes directly:

- int4, any of the group sizes in :data:`INT4_GROUPS`: ``aten._weight_int4pack_mm_for_cpu`` (the kernel torchao's
  int4 weight-only CPU path calls). Its format, per group of the input dimension: w = (q - 8) * scale + zero, so
  our w = offset + q * scale maps exactly with zero = offset + 8 * scale.
- int8 with one group per row (``group_size == in_features``; ``--group-size 0`` asks for that):
  ``aten._weight_int8pack_mm`` takes signed codes and one scale per output row, no offset. With
  q' = q - 128 and zero = offset + 128 * scale, y = (x @ q'^T) * scale + sum(x) * zero, exactly.

Both run with bfloat16 activations (their float32 paths are slow), which adds a relative output error of about
3e-3 — below the rounding error of the weights themselves; :func:`set_packed_kernels` turns them off (exact
float32 dequantization) for bit-exact comparisons.

The kernel's weight layout is built from the stored codes on first use (bytes: about the packed size again)
and rebuilt when the codes change (a ``load_state_dict`` writes them in place). It never runs where a
gradient must flow through the input (healing uses the exact path), nor off the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from .memo import VersionMemo
from .packing import unpack_codes

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernel takes
_ENABLED = {"packed": True}


def set_packed_kernels(enabled: bool) -> None:
    """Use (True, the default) or bypass (False: exact float32 dequantization) the int4/int8 CPU kernels."""
    _ENABLED["packed"] = bool(enabled)


@contextmanager
def packed_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, use (or bypass) the CPU kernels; the previous setting comes back afterwards."""
    previous = _ENABLED["packed"]
    set_packed_kernels(enabled)
    try:
        yield
    finally:
        set_packed_kernels(previous)


@functools.cache
def kernel_available(bits: int) -> bool:
    """Whether this PyTorch build has the CPU matmul for ``bits``-bit codes (and, for int4, its conversion)."""
    ops = torch.ops.aten
    if bits == 4:
        return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    return bits == 8 and hasattr(ops, "_weight_int8pack_mm")


INT4_ROWS = 16  # the int4 kernel's weight layout takes output rows in multiples of this


def kernel_fits(bits: int, group_size: int, in_features: int, out_features: int = INT4_ROWS) -> bool:
    """Whether a packed (out_features x in_features) weight of this kind has a CPU kernel (whatever the input)."""
    if bits == 4:
        fits = group_size in INT4_GROUPS and in_features % group_size == 0 and out_features % INT4_ROWS == 0
        return fits and kernel_available(4)
    return bits == 8 and group_size == in_features and kernel_available(8)


def kernel_applies(module: nn.Module, shape: tuple[int, int], x: torch.Tensor) -> bool:
    """Whether a forward with input ``x`` through ``module``'s packed (out x in) weight may take a kernel: not where a
    gradient must flow through the input, nor while the module's scales train (healing with train='scales'
    parametrizes them; the kernel would neither follow nor differentiate them)."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if not _ENABLED["packed"] or needs_grad or x.device.type != "cpu" or parametrize.is_parametrized(module):
        return False
    return kernel_fits(module.bits, module.group_size, shape[1], shape[0])


def kernel_weight(module: nn.Module, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s packed (codes, scale, offset) of an (out x in) weight -> the kernel's two operands: int4
    (weight, scales_and_zeros) or int8 (signed codes, bf16 rows [scale, zero])."""
    out_features, in_features = shape
    codes = unpack_codes(module.codes, module.bits)[: out_features * in_features].view(out_features, in_features)
    groups = in_features // module.group_size
    scale = module.scale.float().view(out_features, groups)
    middle = 8 if module.bits == 4 else 128
    zero = module.offset.float().view(out_features, groups) + middle * scale
    if module.bits == 4:
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)
        return weight, torch.stack((scale.t(), zero.t()), dim=-1).contiguous().to(torch.bfloat16)
    signed = (codes.to(torch.int16) - 128).to(torch.int8)
    return signed, torch.stack((scale.view(-1), zero.view(-1))).to(torch.bfloat16)  # (2, out): rows contiguous


def cached_kernel_weight(module: nn.Module, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kernel_weight` of ``module`` (buffers codes/scale/offset), built once per version of them."""
    memo = module.__dict__.setdefault("_packed_kernel_memo", VersionMemo())
    return memo.get((module.codes, module.scale, module.offset), lambda: kernel_weight(module, shape))


def kernel_linear(x: torch.Tensor, module: nn.Module, shape: tuple[int, int]) -> torch.Tensor:
    """x @ W^T through the kernel for ``module``'s packed weight (bfloat16 activations), returned in x's dtype
    and leading shape. Call only where :func:`kernel_applies` said yes."""
    weight, extra = cached_kernel_weight(module, shape)
    rows = x.reshape(-1, x.shape[-1])
    flat = rows.to(torch.bfloat16)
    if module.bits == 4:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight, module.group_size, extra)
    else:
        out = torch.ops.aten._weight_int8pack_mm(flat, weight, extra[0])  # the kernel reads scales contiguously
        out = out.float() + rows.float().sum(dim=-1, keepdim=True) * extra[1].float()
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])
