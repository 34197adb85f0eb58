"""The lm-evaluation-harness side of :func:`bondcut.zeroshot.zero_shot` (imports lm_eval: load lazily).

An in-memory model goes to lm-eval as ``HFLM(pretrained=model, tokenizer=tokenizer)``; the task files come
from ``TaskManager(include_path=..., include_defaults=False)`` so lm-eval does not index its ~14k built-in
tasks (~13 s). lm-eval's progress bars and INFO/WARNING logs are silenced for the call; request caching is
off (its default).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import lm_eval
import lm_eval.api.task
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tqdm import tqdm

ProgressFn = Callable[[int, int], None]
METRICS = ("acc", "acc_norm")
_LOGGERS = ("lm_eval", "lm-eval", "datasets")


class _Progress:
    """Stands in for lm-eval's cache hook, which HFLM calls once per finished loglikelihood request."""

    def __init__(self, on_request: ProgressFn | None) -> None:
        self.on_request = on_request
        self.done = self.total = 0

    def add_partial(self, attr: str, request: object, result: object) -> None:
        self.done += 1
        if self.on_request is not None:
            self.on_request(self.done, self.total)


class QuietHFLM(HFLM):
    """lm-eval's HFLM without tqdm bars, reporting ``on_request(done, total)`` as requests finish."""

    def __init__(self, model, tokenizer, batch_size: int, on_request: ProgressFn | None = None) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.progress = _Progress(on_request)
        self.set_cache_hook(self.progress)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.progress.done, self.progress.total = 0, len(requests)
        return super().loglikelihood(requests, disable_tqdm=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval, and the datasets library it reads the JSONL with, log only errors and draw no bars inside."""
    import datasets

    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    bars_were_on = not datasets.are_progress_bars_disabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    # Task.build_all_requests draws a tqdm bar it offers no switch for
    no_bar = mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True))
    try:
        with no_bar:
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def _summary(results: dict, name: str) -> dict:
    """lm-eval's numbers for one task: acc, acc_stderr, acc_norm, acc_norm_stderr (None if absent) and n."""
    metrics = results["results"][name]
    summary: dict = {}
    for metric in METRICS:
        for key in (metric, f"{metric}_stderr"):
            value = metrics.get(f"{key},none")
            summary[key] = float(value) if isinstance(value, (int, float)) else None
    summary["n"] = int(results["n-samples"][name]["effective"])
    return summary


def run_tasks(
    model,
    tokenizer,
    names: tuple[str, ...],
    include_path: Path,
    limit: int | None,
    batch_size: int,
    on_request: ProgressFn | None = None,
) -> dict[str, dict]:
    """One ``lm_eval.simple_evaluate`` over ``names``; per task the :func:`_summary` dict."""
    with _quiet():
        lm = QuietHFLM(model, tokenizer, batch_size=batch_size, on_request=on_request)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names),
            task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
            limit=limit,
            log_samples=False,
        )
    return {name: _summary(results, name) for name in names}
