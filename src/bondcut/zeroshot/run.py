"""``zero_shot(model, tokenizer)``: accuracy on the held-out Brown tasks through lm-evaluation-harness."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .taskfiles import TASKS, check_tasks, task_dir


def check_limit(limit: int | None) -> None:
    """A ValueError unless ``limit`` is None or a positive int (lm-eval also takes fractions; we do not)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (all items) or a positive int, got {limit!r}; e.g. limit=100")


def zero_shot(
    model,
    tokenizer,
    tasks: Iterable[str] | str = TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    on_request: Callable[[int, int], None] | None = None,
) -> dict[str, dict]:
    """Zero-shot accuracy of an in-memory causal LM on bondcut's Brown-corpus tasks, scored by lm-eval.

    ``tasks`` names tasks of :data:`TASKS` (``brown_cloze``, ``brown_lastword``); ``limit`` scores only the
    first ``limit`` items of each (they are stored in a seeded random order, so a prefix mixes genres);
    ``on_request(done, total)`` is called as lm-eval's loglikelihood requests finish (4 per cloze item, 1 per
    last-word item). Returns per task ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}`` exactly
    as lm-eval reports them (``acc_norm`` is None for ``brown_lastword``, which has no length-normalized
    score). Needs ``pip install lm-eval==0.4.13``. Example::

        zero_shot(model, tok, tasks=("brown_cloze",), limit=100)
        # {'brown_cloze': {'acc': 0.71, 'acc_stderr': 0.0456, 'acc_norm': 0.69, ..., 'n': 100}}
    """
    names = check_tasks(tasks)
    check_limit(limit)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}; e.g. batch_size=8")
    try:
        from ._lmeval import run_tasks
    except ImportError as err:
        raise ImportError(f"zero-shot tasks need lm-evaluation-harness: pip install lm-eval==0.4.13 ({err})") from err
    from ..quant.dense_cache import dequantize_once

    with dequantize_once():  # packed weights dequantized once, not for every batch of requests
        return run_tasks(model, tokenizer, names, task_dir(), limit=limit, batch_size=batch_size, on_request=on_request)
