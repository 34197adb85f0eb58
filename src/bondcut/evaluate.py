"""Quality report of one model: held-out perplexity on the shipped corpus, greedy generations and, on
request, zero-shot accuracy on the held-out Brown tasks through lm-eval (:mod:`bondcut.zeroshot`).

The pieces of ``bondcut eval`` (issue 4); speed figures come next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .corpus import split_text
from .perplexity import perplexity
from .quant.dense_cache import dequantize_once
from .zeroshot import check_limit, check_tasks, zero_shot

PROMPTS = (
    "The capital of France is",
    "In 1961 the city council voted to",
    "The most important thing about a good book is",
)


@dataclass
class EvalReport:
    """Perplexity (with its context, stride and token count), prompt -> greedy continuation, and per
    zero-shot task lm-eval's ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}`` (empty if none ran)."""

    perplexity: dict
    corpus: str
    generations: dict[str, str] = field(default_factory=dict)
    zero_shot: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def generate_greedy(model, tokenizer, prompts: tuple[str, ...] = PROMPTS, max_new_tokens: int = 16) -> dict[str, str]:
    """Greedy continuation of each prompt (deterministic), decoded without the prompt."""
    out = {}
    with torch.no_grad(), dequantize_once():  # packed weights dequantized once, not for every token and prompt
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            tokens = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
            out[prompt] = tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
    return out


def evaluate(
    model,
    tokenizer,
    context: int = 512,
    stride: int = 256,
    max_tokens: int | None = 8192,
    genres: str = "a",
    on_window: Callable[[int, int], None] | None = None,
    tasks: Sequence[str] = (),
    task_limit: int | None = None,
    on_request: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Held-out perplexity (Brown corpus, genres ``genres``; default press reportage) and generations, plus
    zero-shot ``tasks`` (e.g. ``("brown_cloze",)``; none by default) on their first ``task_limit`` items."""
    names = check_tasks(tasks) if tasks else ()  # an unknown task or bad limit fails before any scoring
    if names:
        check_limit(task_limit)
    ppl = perplexity(model, tokenizer, split_text("heldout", genres=genres), context=context, stride=stride,
                     max_tokens=max_tokens, on_window=on_window)  # fmt: skip
    return EvalReport(
        perplexity=ppl.to_dict(),
        corpus=f"brown heldout genres={genres}",
        generations=generate_greedy(model, tokenizer),
        zero_shot=zero_shot(model, tokenizer, names, limit=task_limit, on_request=on_request) if names else {},
    )
