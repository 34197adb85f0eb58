"""Exact evaluation of packed models without dequantizing every weight on every call.

Outside the CPU kernels a packed layer dequantizes its whole weight for each forward call: for a perplexity window,
a zero-shot request or a generated token, every packed weight of the model again (decoding 16 tokens of an int8
SmolLM2 that way dequantized 135 M weights 16 times). Within :func:`dequantize_once` a packed weight is dequantized at
its first use without gradient and reused while its codes, scales and offsets stay as they are: the same values,
so the same outputs, for the memory of the packed layers' float weights until the block ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .memo import VersionMemo

_CACHE: dict[str, dict[nn.Module, VersionMemo] | None] = {"weights": None}


@contextmanager
def dequantize_once() -> Iterator[None]:
    """Within the block, :func:`exact_weight` keeps each packed weight it dequantizes (an enclosing block's cache
    is shared; the outermost block frees it)."""
    if _CACHE["weights"] is not None:
        yield
        return
    _CACHE["weights"] = {}
    try:
        yield
    finally:
        _CACHE["weights"] = None


def exact_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight_values()``: from the cache within :func:`dequantize_once` when no gradient is wanted
    (recomputed when its codes, scale or offset change in place), else dequantized for this call."""
    cache = _CACHE["weights"]
    if cache is None or torch.is_grad_enabled():
        return module.weight_values()
    memo = cache.setdefault(module, VersionMemo())
    return memo.get((module.codes, module.scale, module.offset), module.weight_values)
