"""How far a model's next-token distribution is from a reference's: log-probabilities of windows and the KL
between them. One definition for the joint search, block replay, healing's sparse distillation and the benches,
so that what the search minimizes is what the benches report."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def next_token_logprobs(model: nn.Module, windows: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Next-token log-probabilities (windows, positions - 1, vocabulary) in float32, ``batch`` windows per
    forward (None: all at once) so that memory stays bounded on long text."""
    step = batch or len(windows)
    return torch.cat([torch.log_softmax(model(windows[i : i + step], use_cache=False).logits[:, :-1].float(), -1)
                      for i in range(0, len(windows), step)])  # fmt: skip


def kl_per_position(reference: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) at each position from log-probabilities over the last dimension (the reference's
    support: a top-k reference gives the KL restricted to its k tokens). Differentiable in ``logprobs``."""
    return (reference.exp() * (reference - logprobs)).sum(-1)


def token_nll(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token, (..., T - 1), from next-token log-probabilities (..., T - 1,
    vocabulary) of the windows ``ids`` (..., T): the text's cross-entropy, which perplexity exponentiates."""
    return -logprobs.gather(-1, ids[..., 1:, None]).squeeze(-1)


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``b - a`` over matched samples (e.g. per-window KLs of two models on the same windows) and its
    standard error: the right test between two models scored on the same text, tighter than two unpaired ones."""
    diff = (b - a).double()
    se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else float("nan")
    return float(diff.mean()), se
