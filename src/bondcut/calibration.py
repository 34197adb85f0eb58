"""Input statistics of chosen layers on calibration text: C = sum_t x_t x_t^T per layer, streamed.

Forward pre-hooks add each batch's X^T X (fp32 matmul, accumulated in fp64) for every named module in one
pass over the calibration split, so memory is one n x n matrix per layer, not the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def token_windows(tokenizer, text: str, tokens: int, context: int) -> torch.Tensor:
    """The first ``tokens`` token ids of ``text`` as whole (rows, context) windows (zero rows if too short).

    Only a prefix of the text is tokenized (~4 characters per token, 8 allowed), the whole text if that
    falls short: long splits cost nothing extra.
    """
    ids = tokenizer(text[: tokens * 8], return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    ids = ids[:tokens]
    return ids[: ids.numel() // context * context].reshape(-1, context)


def calibration_windows(tokenizer, tokens: int, context: int, text: str | None = None) -> torch.Tensor:
    """``tokens`` tokens of the corpus's calibration split (or ``text``) as (rows, context) windows."""
    from .corpus import split_text

    text = split_text("calibration") if text is None else text
    windows = token_windows(tokenizer, text, tokens, context)
    if not len(windows):
        got = min(tokens, len(tokenizer(text).input_ids))  # only on this error path: the text is short
        raise ValueError(f"need at least {context} calibration tokens, got {got}")
    return windows


def unseen_calibration_windows(tokenizer, tokens: int, context: int) -> torch.Tensor:
    """``tokens`` tokens from the end of the calibration split, as (rows, context) windows: text the input
    statistics (taken from its start) have not seen, so a search measuring choices fitted to those statistics
    (activation-aware decompositions, GPTQ) on it is not flattered by them (disjoint while the split holds
    statistics' tokens + ``tokens``: 136k tokens for the Brown split)."""
    from .corpus import split_text

    text = split_text("calibration")
    tail = text[-tokens * 8 :]  # ~4 characters per token: enough for ``tokens``
    return calibration_windows(tokenizer, tokens, context, tail[tail.find(" ") + 1 :])


def input_covariances(
    model: nn.Module,
    tokenizer,
    names: Sequence[str],
    tokens: int = 16384,
    context: int = 512,
    text: str | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """(name -> sum of x x^T over ``tokens`` calibration tokens (fp64, n x n), tokens seen) for modules ``names``.

    The text defaults to the corpus's calibration split, cut into windows of ``context`` tokens.
    """
    windows = calibration_windows(tokenizer, tokens, context, text)
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def add(module: nn.Module, args) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, n)
            gram = (x.T @ x).double()
            sums[name] = gram if name not in sums else sums[name] + gram

        return add

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for i, window in enumerate(windows):
                model(window[None])
                if on_window is not None:
                    on_window(i + 1, len(windows))
    finally:
        for handle in handles:
            handle.remove()
    return sums, windows.numel()
