"""Sliding-window perplexity of a causal LM on a text.

The method of Hugging Face's "Perplexity of fixed-length models" guide: the text is tokenized once, windows
of ``context`` tokens start every ``stride`` tokens, and each window scores only the tokens that the previous
window did not, so every scored token sees at least ``context - stride`` tokens of context (except near the
start). The negative log-likelihood is summed over tokens and divided by their exact count, so
``perplexity = exp(sum of per-token NLL / tokens_scored)``. The first token of the text is never scored, and
with ``stride == context`` neither is the first token of each window (it has no context).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll)``; ``nll`` is the mean negative log-likelihood per scored token, in nats."""

    perplexity: float
    nll: float
    tokens_scored: int
    context: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window; tokens ``first_scored .. end-1`` are scored in it."""
    spans = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)  # token ``begin`` has no context in its window
        if first < end:  # a trailing 1-token window would score nothing
            spans.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def _batches(spans: list[tuple[int, int, int]], batch_size: int):
    """Runs of up to ``batch_size`` consecutive windows of the same length and scored count."""
    group: list[tuple[int, int, int]] = []
    for span in spans:
        if group and (len(group) == batch_size or _shape(span) != _shape(group[0])):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def _shape(span: tuple[int, int, int]) -> tuple[int, int]:
    begin, end, first = span
    return end - begin, end - first


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _validate(model, context: int, stride: int, max_tokens: int | None, batch_size: int) -> None:
    example = "e.g. perplexity(model, tokenizer, text, context=512, stride=256)"
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an int >= 2, got {context!r}; {example}")
    if not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(f"stride must be an int with 1 <= stride <= context ({context}), got {stride!r}; {example}")
    limit = _max_positions(model.config)
    if limit is not None and context > limit:
        raise ValueError(f"context {context} exceeds the model's {limit} positions; {example}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens must be None or an int >= 2, got {max_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def perplexity(
    model,
    tokenizer,
    text: str,
    context: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 1,
    on_window: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with windows of ``context`` tokens moving by ``stride``.

    ``max_tokens`` keeps only the first that many tokens of the text. ``batch_size`` windows of equal length
    run together. ``on_window(done, total)`` is called after each window, for progress reporting.
    """
    import torch
    import torch.nn.functional as F

    from .quant.dense_cache import dequantize_once

    _validate(model, context, stride, max_tokens, batch_size)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # (N,)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"text too short: it has {ids.numel()} token(s), at least 2 are needed to score one")

    spans = windows(ids.numel(), context, stride)
    device = next(model.parameters()).device
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    nll_sum, scored, done = 0.0, 0, 0
    try:
        with torch.no_grad(), dequantize_once():  # packed weights dequantized once, not for every window
            for group in _batches(spans, batch_size):
                n_new = group[0][1] - group[0][2]  # tokens scored per window
                batch = torch.stack([ids[begin:end] for begin, end, _ in group]).to(device)  # (B, L)
                # Logits at positions L-n_new-1 .. L-2 predict the scored tokens at L-n_new .. L-1.
                kwargs = {"logits_to_keep": n_new + 1} if keep_logits else {}
                logits = model(input_ids=batch, **kwargs).logits[:, -(n_new + 1) : -1]  # (B, n_new, V)
                targets = batch[:, -n_new:]  # (B, n_new)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
                nll_sum += loss.item()
                scored += targets.numel()
                for _ in group:
                    done += 1
                    if on_window is not None:
                        on_window(done, len(spans))
    finally:
        model.train(was_training)
    nll = nll_sum / scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens_scored=scored, context=context, stride=stride)


HELDOUT_CONTEXT = 512
HELDOUT_STRIDE = 256


def heldout_perplexity(
    model,
    tokenizer,
    max_tokens: int | None = 8192,
    genres: str = "a",
    on_window: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """bondcut's held-out figure, the one every table and curve reports: the first ``max_tokens`` tokens of the
    Brown corpus's held-out files of ``genres`` (default press reportage), context 512, stride 256."""
    from .corpus import split_text

    text = split_text("heldout", genres=genres)
    return perplexity(model, tokenizer, text, HELDOUT_CONTEXT, HELDOUT_STRIDE, max_tokens=max_tokens,
                      on_window=on_window)  # fmt: skip
