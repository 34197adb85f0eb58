"""Fast CPU inference for 4-bit packed weights: PyTorch's int4 matmul kernel instead of dequantizing.

Dequantizing a packed weight on every call costs far more than the matmul at decode time (one token: a
576 x 49,152 tied head took ~0.2 s that way). ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (the kernel
torchao's int4 weight-only CPU path calls) multiplies by the 4-bit codes directly. Its format, per group of
the input dimension: w = (q - 8) * scale + zero, so our w = offset + q * scale maps exactly with
zero = offset + 8 * scale. It runs with bfloat16 activations (its float32 path is slow), which adds a relative
output error of about 3e-3 — far below int4's own rounding error; :func:`set_int4_kernel` turns it off
(exact float32 dequantization) for bit-exact comparisons.

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

from .packing import unpack_codes

KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes the kernel takes
_ENABLED = {"int4": True}


def set_int4_kernel(enabled: bool) -> None:
    """Use (True, the default) or bypass (False: exact float32 dequantization) the int4 CPU kernel."""
    _ENABLED["int4"] = bool(enabled)


@contextmanager
def int4_kernel(enabled: bool) -> Iterator[None]:
    """Within the block, use (or bypass) the int4 CPU kernel; the previous setting comes back afterwards."""
    previous = _ENABLED["int4"]
    set_int4_kernel(enabled)
    try:
        yield
    finally:
        set_int4_kernel(previous)


@functools.cache
def int4_kernel_available() -> bool:
    """Whether this PyTorch build has the CPU int4 matmul and its weight conversion."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def int4_kernel_applies(bits: int, group_size: int, in_features: int, x: torch.Tensor) -> bool:
    """Whether a forward with input ``x`` through a packed weight of this kind may take the kernel."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    fits = bits == 4 and group_size in KERNEL_GROUPS and in_features % group_size == 0
    return _ENABLED["int4"] and fits and not needs_grad and x.device.type == "cpu" and int4_kernel_available()


def int4_kernel_weight(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, shape: tuple[int, int], group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our packed (codes, scale, offset) of an (out x in) weight -> the kernel's (weight, scales_and_zeros)."""
    out_features, in_features = shape
    codes = unpack_codes(codes, 4)[: out_features * in_features].view(out_features, in_features)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)
    scale = scale.float().view(out_features, in_features // group_size)
    zero = offset.float().view(out_features, in_features // group_size) + 8 * scale
    return weight, torch.stack((scale.t(), zero.t()), dim=-1).contiguous().to(torch.bfloat16)


def cached_int4_weight(module: nn.Module, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s packed weight (buffers codes/scale/offset) in the kernel's layout, built once per codes."""
    key = (module.codes.data_ptr(), module.codes._version, module.scale._version, module.offset._version)
    cached = module.__dict__.get("_int4_kernel_cache")
    if cached is None or cached[0] != key:
        cached = (key, *int4_kernel_weight(module.codes, module.scale, module.offset, shape, module.group_size))
        module.__dict__["_int4_kernel_cache"] = cached
    return cached[1], cached[2]


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x @ W^T through the kernel (bfloat16 activations), returned in x's dtype and leading shape."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight, group_size, scales_zeros)
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])
