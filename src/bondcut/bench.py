"""Speed and memory of models, side by side: prefill, decode, a training step, RSS, parameter and disk bytes.

Each (model, phase) runs in a fresh child process so that peak RSS belongs to that model and phase alone and
one model's warm caches cannot help another. Every timing is repeated after a warm-up; we report
min/median/max so the machine's noise stays visible, the CPU share other processes took while we measured,
and every figure of a model as a ratio to the baseline measured in the same run.

Run as ``python -m bondcut.bench PHASE MODEL SETTINGS_JSON`` it is that child: it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .timing import CpuContention, environment, repeat_timings, summarize

PHASES = ("inference", "training")


@dataclass
class BenchSettings:
    """What is measured and how often. Defaults follow issue 4: prefill 1x512, decode batch 1 and 8, train 8x256."""

    threads: int = 2
    prefill_tokens: int = 512
    decode_batches: tuple[int, ...] = (1, 8)
    decode_prompt_tokens: int = 32
    decode_new_tokens: int = 32
    train_batch: int = 8
    train_seq: int = 256
    # "all": every parameter trains; "mpo": only MPO cores (+ their biases); "auto": "mpo" for models with MPO
    # layers and "all" for the others (healing vs fine-tuning the original: what each would really train)
    train_params: str = "all"
    warmup: int = 1
    repeats: int = 5
    tune: bool = False  # choose each MPO layer's inference merge by measured latency before timing
    allow_dense: bool = False  # let tune materialize dense weights (faster, gives back the memory saving)

    def __post_init__(self) -> None:
        if self.train_params not in ("all", "mpo", "auto"):
            raise ValueError(f"train_params must be 'all', 'mpo' or 'auto', got {self.train_params!r}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={self.repeats}, warmup={self.warmup}")
        self.decode_batches = tuple(int(b) for b in self.decode_batches)


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _text_ids(tokenizer, split: str, count: int, rows: int) -> torch.Tensor:
    """``rows`` x ``count`` token ids of real corpus text (consecutive chunks), deterministic."""
    from .calibration import token_windows
    from .corpus import split_text

    windows = token_windows(tokenizer, split_text(split), rows * count, count)
    if len(windows) < rows:
        raise ValueError(f"the {split} split has fewer than {rows} x {count} tokens")
    return windows


class _TokenClock:
    """A stopping criterion that never stops: it only timestamps each decoding step of ``generate``."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _decode_rate(model, tokenizer, ids: torch.Tensor, new_tokens: int) -> float:
    """Generated tokens per second of KV-cached greedy decoding, prefill excluded (first token's step dropped)."""
    from transformers import StoppingCriteriaList

    clock = _TokenClock()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tokenizer.eos_token_id, stopping_criteria=StoppingCriteriaList([clock]))  # fmt: skip
    steps = len(clock.stamps) - 1
    if steps < 1:
        raise ValueError(f"decode needs at least 2 new tokens, got {new_tokens}")
    return ids.shape[0] * steps / (clock.stamps[-1] - clock.stamps[0])


def _model_facts(model, source: str) -> dict:
    from .models import resolve_model
    from .mpo_linear import MPOLinear
    from .sizes import directory_weight_bytes

    mpo = [m for m in model.modules() if isinstance(m, MPOLinear)]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "mpo_layers": len(mpo),
        "mpo_params": sum(m.num_params for m in mpo),
        "disk_bytes": directory_weight_bytes(resolve_model(source)),
    }


def measure_inference(source: str, settings: BenchSettings) -> dict:
    """Load ``source`` and time prefill (1 x prefill_tokens) and KV-cached greedy decode per batch size."""
    from .models import load_model

    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    model, tokenizer = load_model(source)
    out = {"load_s": time.perf_counter() - start, "rss_after_load_mb": _rss_mb(), **_model_facts(model, source)}
    if settings.tune and out["mpo_layers"]:
        from .tune import inference_extra_bytes, tune

        start = time.perf_counter()
        choices = tune(model, tokens=(1, settings.prefill_tokens), allow_dense=settings.allow_dense)
        out["tune"] = {
            "seconds": time.perf_counter() - start,
            "allow_dense": settings.allow_dense,
            "extra_bytes": inference_extra_bytes(model),
            "layers": [c.to_dict() for c in choices],
        }
    prompt = _text_ids(tokenizer, "heldout", settings.prefill_tokens, 1)
    with torch.no_grad(), CpuContention() as busy:
        prefill = repeat_timings(lambda: model(prompt, use_cache=True), settings.warmup, settings.repeats)
        out["prefill_tokens_per_s"] = summarize([settings.prefill_tokens / t for t in prefill])
        for batch in settings.decode_batches:
            ids = _text_ids(tokenizer, "heldout", settings.decode_prompt_tokens, batch)
            rates = [_decode_rate(model, tokenizer, ids, settings.decode_new_tokens) for _ in range(settings.warmup)]
            rates = [_decode_rate(model, tokenizer, ids, settings.decode_new_tokens) for _ in range(settings.repeats)]
            out[f"decode_b{batch}_tokens_per_s"] = summarize(rates)
    out["cpu_contention"] = busy.result
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def measure_training(source: str, settings: BenchSettings) -> dict:
    """Time one optimizer step: forward + backward + AdamW on train_batch x train_seq tokens of training text."""
    from .heal import optimizer_state_bytes, trainable_parameters
    from .models import load_model

    torch.set_num_threads(settings.threads)
    model, tokenizer = load_model(source)
    out = {"rss_after_load_mb": _rss_mb(), **_model_facts(model, source)}
    model.train()
    try:
        params = trainable_parameters(model, settings.train_params)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    optimizer = torch.optim.AdamW(params, lr=1e-6)  # tiny: the timing must not depend on the model drifting
    batch = _text_ids(tokenizer, "train", settings.train_seq, settings.train_batch)

    def step() -> None:
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with CpuContention() as busy:
        steps = repeat_timings(step, max(settings.warmup, 1), settings.repeats)  # step 1 allocates the optimizer state
    tokens = settings.train_batch * settings.train_seq
    out.update(
        step_s=summarize(steps),
        train_tokens_per_s=summarize([tokens / t for t in steps]),
        trainable_params=sum(p.numel() for p in params),
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        cpu_contention=busy.result,
        peak_rss_mb=_peak_rss_mb(),
    )
    return out


def _run_child(phase: str, source: str, settings: BenchSettings) -> dict:
    cmd = [sys.executable, "-m", "bondcut.bench", phase, source, json.dumps(asdict(settings))]
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench {phase} of {source} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# figure -> (path inside a model's results, True if larger is better)
RATIO_FIGURES = {
    "prefill_speedup": (("inference", "prefill_tokens_per_s", "median"), True),
    "train_step_speedup": (("training", "step_s", "median"), False),
    "params": (("inference", "params"), None),
    "param_bytes": (("inference", "param_bytes"), None),
    "disk_bytes": (("inference", "disk_bytes"), None),
    "inference_peak_rss": (("inference", "peak_rss_mb"), None),
    "training_peak_rss": (("training", "peak_rss_mb"), None),
    "optimizer_state_bytes": (("training", "optimizer_state_bytes"), None),
}


def _get(results: dict, path: Sequence[str]):
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def ratios(model: dict, baseline: dict, decode_batches: Sequence[int]) -> dict:
    """Each figure of ``model`` relative to ``baseline``: speedups (>1 = faster) and size fractions (<1 = smaller)."""
    figures = dict(RATIO_FIGURES)
    for b in decode_batches:
        figures[f"decode_b{b}_speedup"] = (("inference", f"decode_b{b}_tokens_per_s", "median"), True)
    out = {}
    for name, (path, higher_is_faster) in figures.items():
        value, base = _get(model, path), _get(baseline, path)
        if value is None or base is None or not base or not value:
            continue
        out[name] = value / base if higher_is_faster in (True, None) else base / value
    return out


def bench(
    models: Sequence[str],
    baseline: str | None = None,
    settings: BenchSettings | None = None,
    phases: Sequence[str] = PHASES,
    on_step: Callable[[str, str, int, int], None] | None = None,
) -> dict:
    """Measure ``baseline`` (if given) and every model, each phase in its own process; ratios to the baseline.

    ``on_step(model, phase, done, total)`` is called before each child process starts (for progress bars).
    """
    settings = settings or BenchSettings()
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phase(s) {sorted(unknown)}; choose from {list(PHASES)}")
    names = ([baseline] if baseline is not None else []) + [m for m in models if m != baseline]
    results: dict[str, dict] = {name: {} for name in names}
    jobs = [(name, phase) for phase in phases for name in names]  # phase-major: baseline and models back to back
    for done, (name, phase) in enumerate(jobs):
        if on_step is not None:
            on_step(name, phase, done, len(jobs))
        results[name][phase] = _run_child(phase, name, settings)
    if on_step is not None:
        on_step("", "", len(jobs), len(jobs))
    report = {"settings": asdict(settings), "environment": environment(settings.threads), "baseline": baseline,
              "models": results}  # fmt: skip
    if baseline is not None:
        report["ratios"] = {
            name: ratios(results[name], results[baseline], settings.decode_batches)
            for name in names
            if name != baseline
        }
    return report


def _child_main(argv: Sequence[str]) -> None:
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    phase, source, settings_json = argv
    settings = BenchSettings(**json.loads(settings_json))
    measure = {"inference": measure_inference, "training": measure_training}[phase]
    print(json.dumps(measure(source, settings)))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
