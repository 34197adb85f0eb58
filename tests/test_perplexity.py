"""Sliding-window perplexity: exact token accounting, agreement with a manual computation, trained vs random."""

from __future__ import annotations

import math

import pytest
import torch

from bondcut.perplexity import PerplexityResult, heldout_perplexity, perplexity, windows


def _ids(tokenizer, text, n):
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[:, :n]  # (1, n)


@pytest.mark.parametrize(
    "n, context, stride", [(300, 128, 128), (160, 64, 32), (1000, 256, 100), (50, 64, 16), (257, 256, 256)]
)
def test_windows_score_each_token_once(n, context, stride):
    scored = [t for begin, end, first in windows(n, context, stride) for t in range(first, end)]
    # Every token but the first is scored once; with stride == context, nor is the first of each window.
    unscored = range(0, n, context) if stride == context else [0]
    assert scored == [t for t in range(n) if t not in unscored]
    spans = windows(n, context, stride)
    assert all(first < end for _, end, first in spans)  # no window that scores nothing
    assert all(end - begin <= context for begin, end, _ in spans)
    assert all(first - begin == max(context - stride, 1) for begin, _, first in spans[1:])  # context kept


def test_trained_model_perplexity_on_heldout_press(trained_model, heldout_text):
    model, tokenizer = trained_model
    result = perplexity(model, tokenizer, heldout_text, context=256, stride=128, max_tokens=2048, batch_size=4)
    # Measured 31.50 (SmolLM2-135M, dequantized Q4_1, first 2,048 tokens of ca01/ca11/...).
    assert 10 < result.perplexity < 80
    assert result.tokens_scored == 2047
    assert result.to_dict() == {
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens_scored": 2047,
        "context": 256,
        "stride": 128,
    }
    assert math.isclose(math.exp(result.nll), result.perplexity)


def test_heldout_perplexity_is_the_press_text_at_context_512_stride_256(trained_model, heldout_text):
    model, tokenizer = trained_model
    figure = heldout_perplexity(model, tokenizer, max_tokens=600)
    assert (figure.context, figure.stride, figure.tokens_scored) == (512, 256, 599)
    assert figure == perplexity(model, tokenizer, heldout_text, context=512, stride=256, max_tokens=600)
    other_genre = heldout_perplexity(model, tokenizer, max_tokens=600, genres="j")
    assert other_genre.perplexity != figure.perplexity


def test_random_weights_perplexity_is_huge(trained_model, heldout_text):
    from transformers import AutoModelForCausalLM

    model, tokenizer = trained_model
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config)
    result = perplexity(random_model, tokenizer, heldout_text, context=128, stride=128, max_tokens=256)
    assert result.perplexity > 1000  # measured ~55,000 (about the vocabulary size, 49,152)


def test_stride_equal_context_matches_manual_chunks(trained_model, heldout_text):
    model, tokenizer = trained_model
    ids = _ids(tokenizer, heldout_text, 300)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(128, dim=1):  # 128, 128, 44 tokens; the first of each has no context
            nll_sum += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    result = perplexity(model, tokenizer, heldout_text, context=128, stride=128, max_tokens=300)
    assert result.tokens_scored == count == 297
    assert math.isclose(result.nll, nll_sum / count, rel_tol=1e-5)


def test_overlapping_windows_match_labels_method_and_batching(trained_model, heldout_text):
    model, tokenizer = trained_model
    ids = _ids(tokenizer, heldout_text, 160)
    nll_sum, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, 160, 32):  # the Hugging Face guide's loop, with exact token counts
            end = min(begin + 64, 160)
            labels = ids[:, begin:end].clone()
            labels[:, : -(end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll_sum += model(ids[:, begin:end], labels=labels).loss.item() * n
            count, prev_end = count + n, end
            if end == 160:
                break
    calls = []
    one = perplexity(
        model,
        tokenizer,
        heldout_text,
        context=64,
        stride=32,
        max_tokens=160,
        on_window=lambda done, total: calls.append((done, total)),
    )
    batched = perplexity(model, tokenizer, heldout_text, context=64, stride=32, max_tokens=160, batch_size=3)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert one.tokens_scored == batched.tokens_scored == count == 159
    assert math.isclose(one.nll, nll_sum / count, rel_tol=1e-5)
    assert math.isclose(batched.nll, one.nll, rel_tol=1e-5)
    assert not model.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"context": 64, "stride": 128}, "stride"),
        ({"context": 64, "stride": 0}, "stride"),
        ({"context": 16384, "stride": 128}, "8192 positions"),
        ({"context": 64, "stride": 32, "max_tokens": 1}, "max_tokens"),
        ({"context": 64, "stride": 32, "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise(trained_model, kwargs, match):
    model, tokenizer = trained_model
    with pytest.raises(ValueError, match=match):
        perplexity(model, tokenizer, "Some text to score.", **kwargs)


def test_text_too_short_raises(trained_model):
    model, tokenizer = trained_model
    with pytest.raises(ValueError, match="too short"):
        perplexity(model, tokenizer, "Hi", context=64, stride=32)


def test_result_is_a_plain_dataclass():
    result = PerplexityResult(perplexity=2.0, nll=math.log(2.0), tokens_scored=3, context=4, stride=2)
    assert result.to_dict()["tokens_scored"] == 3
