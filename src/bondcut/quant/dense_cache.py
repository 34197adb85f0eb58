"""Exact evaluation of packed models without dequantizing every weight on every call.

Outside the CPU kernels a packed layer dequantizes its whole weight for each forward call: for a perplexity window,
a zero-shot request or a generated token, every packed weight of the model again (decoding 16 tokens of an int8
SmolLM2 that way dequantized 135 M weights 16 times). Within :func:`dequantize_once` a packed weight is dequantized at
its first use without gradient and reused while its codes, scales and offsets stay as they are: the same values,
so the same outputs, for the memory of the packed layers' float weights until the block ends. The cache holds at most
``limit_bytes`` (default :data:`CACHE_LIMIT_BYTES`): past it, weights dequantize per call again, so a model too big
to hold in float still evaluates in its packed memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .memo import VersionMemo

CACHE_LIMIT_BYTES = 4 * 2**30  # float weights kept at most (SmolLM2-135M's packed layers: 0.54 GB in float32)
_CACHE: dict = {"weights": None, "bytes": 0, "limit": CACHE_LIMIT_BYTES}


@contextmanager
def dequantize_once(limit_bytes: int = CACHE_LIMIT_BYTES) -> Iterator[None]:
    """Within the block, :func:`exact_weight` keeps each packed weight it dequantizes, up to ``limit_bytes`` in
    all (an enclosing block's cache and limit are shared; the outermost block frees it)."""
    if _CACHE["weights"] is not None:
        yield
        return
    _CACHE.update(weights={}, bytes=0, limit=limit_bytes)
    try:
        yield
    finally:
        _CACHE.update(weights=None, bytes=0)


def exact_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight_values()``: from the cache within :func:`dequantize_once` when no gradient is wanted
    (recomputed when its codes, scale or offset change in place), else dequantized for this call."""
    cache = _CACHE["weights"]
    if cache is None or torch.is_grad_enabled():
        return module.weight_values()
    memo = cache.get(module)
    if memo is None:
        weight = module.weight_values()
        size = weight.numel() * weight.element_size()
        if _CACHE["bytes"] + size > _CACHE["limit"]:
            return weight  # over the limit: this one dequantizes per call
        _CACHE["bytes"] += size
        memo = cache[module] = VersionMemo()
        return memo.get((module.codes, module.scale, module.offset), lambda: weight)
    return memo.get((module.codes, module.scale, module.offset), module.weight_values)
