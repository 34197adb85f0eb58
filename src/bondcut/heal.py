"""Healing: a short retraining of a compressed model so its layers adapt to each other (CompactifAI's step 3).

Next-token loss on the corpus's train split, optionally mixed with distillation from the original model
(KL between temperature-softened distributions, Hinton et al. 2015). AdamW with linear warm-up and cosine decay,
gradient accumulation and clipping, optional gradient checkpointing, bf16 autocast on a GPU. The MPO cores stay
cores: the layers' forward contracts them, so gradients and optimizer state are MPO-sized.

Runs on one process, or on several under ``torchrun``/``accelerate launch`` (DDP through accelerate): the global
batch of each step is the same whatever the number of processes, so curves compare. Every ``checkpoint_every``
steps the trainable state, optimizer, schedule and curve are written atomically; ``resume`` continues from
there and ends exactly where an uninterrupted run of the same seed would (the data order is a function of the step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .mpo_linear import MPOLinear

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass
class HealConfig:
    """How to heal.

    Attributes:
        tokens: training tokens in total (global batch x seq_len x steps); say how this compares to one pass.
        seq_len: tokens per training sequence.
        batch_size: sequences per optimizer step, over all processes and accumulation micro-steps.
        micro_batch: sequences per forward/backward on one process (accumulation = batch / (micro x processes)).
        lr: peak learning rate; warmup: fraction of steps warming up linearly; min_lr_ratio: cosine floor.
        weight_decay, max_grad_norm: AdamW weight decay and gradient-norm clip.
        train: "mpo" (MPO cores and their biases only) or "all" parameters.
        distill: weight of the distillation term (0 = next-token loss only, 1 = distillation only); needs a teacher.
        temperature: softening of both distributions in the distillation term.
        eval_every: steps between held-out perplexity measurements (0 = only before and after).
        eval_tokens: held-out tokens scored each time (context 512, stride 256).
        checkpoint_every: steps between checkpoints (0 = none).
        gradient_checkpointing: recompute activations in backward (less memory, ~30 % more time).
        seed: data order and any randomness.
    """

    tokens: int = 262_144
    seq_len: int = 256
    batch_size: int = 8
    micro_batch: int = 4
    lr: float = 1e-4
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train: str = "mpo"
    distill: float = 0.0
    temperature: float = 1.0
    eval_every: int = 0
    eval_tokens: int = 4096
    checkpoint_every: int = 0
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train not in ("mpo", "all"):
            raise ValueError(f"train must be 'mpo' (cores only) or 'all', got {self.train!r}")
        if not 0 <= self.distill <= 1 or self.temperature <= 0:
            raise ValueError(f"distill must be in [0, 1] and temperature > 0, got {self.distill}, {self.temperature}")
        if min(self.tokens, self.seq_len, self.batch_size, self.micro_batch) < 1 or self.lr <= 0:
            raise ValueError("tokens, seq_len, batch_size, micro_batch and lr must be positive; "
                             "e.g. HealConfig(tokens=262144, seq_len=256, batch_size=8)")  # fmt: skip

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


@dataclass
class HealResult:
    """The curve (step, train loss, lr, tokens/s) and held-out perplexity before, during and after."""

    config: dict
    steps: int
    processes: int
    trainable_params: int
    optimizer_state_bytes: int
    train_tokens_per_pass: int
    seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"step", "perplexity", "tokens", "context", "stride"}

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_parameters(model: nn.Module, train: str) -> list[nn.Parameter]:
    """Mark and return what trains: "all" parameters, or "mpo" (only the MPO layers' cores and biases), or
    "auto" ("mpo" for a model with MPO layers, "all" otherwise: what healing or fine-tuning would train)."""
    if train == "auto":
        train = "mpo" if any(isinstance(m, MPOLinear) for m in model.modules()) else "all"
    if train == "all":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        for module in model.modules():
            if isinstance(module, MPOLinear):
                module.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no MPO layers to train; compress it first, or heal with train='all'")
    return params


def lr_factor(step: int, total: int, warmup: float, floor: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to ``floor`` of the peak."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), mean over positions. Logits: (..., vocab)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)  # (positions, vocab)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def heal(
    model: nn.Module,
    tokenizer,
    config: HealConfig,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> HealResult:
    """Retrain ``model`` in place on the train split; returns the curve. See the module docstring."""
    from accelerate import Accelerator

    from .train_data import SequenceStream, split_token_ids

    if config.distill > 0 and teacher is None:
        raise ValueError("distill > 0 needs the original model as teacher (CLI: --teacher ORIGINAL)")
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % (config.micro_batch * world):
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of micro_batch x processes "
                         f"({config.micro_batch} x {world})")  # fmt: skip
    accumulation = config.batch_size // (config.micro_batch * world)
    stream = SequenceStream(split_token_ids(tokenizer, "train"), config.seq_len, config.batch_size, config.seed)
    params = trainable_parameters(model, config.train)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup, config.min_lr_ratio)
    )
    if teacher is not None:
        teacher.requires_grad_(False).eval()
        teacher.to(accelerator.device)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    result = HealResult(asdict(config), config.steps, world, sum(p.numel() for p in params), 0, stream.tokens_per_pass)
    start_step = 0
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT
    if resume and checkpoint is not None and checkpoint.exists():
        start_step, result = _load_checkpoint(checkpoint, accelerator.unwrap_model(wrapped), optimizer, schedule)
        log.info("resumed at step %d from %s", start_step, checkpoint)
    else:
        result.evals.append(_evaluate(accelerator, wrapped, tokenizer, 0, config.eval_tokens))
    began = time.perf_counter() - result.seconds
    for step in range(start_step, config.steps):
        tick = time.perf_counter()
        wrapped.train()
        rows = stream.batch(step, rank, world).to(accelerator.device)  # (batch / world, seq_len)
        total = 0.0
        for micro in range(accumulation):
            ids = rows[micro * config.micro_batch : (micro + 1) * config.micro_batch]
            sync = micro == accumulation - 1
            with accelerator.no_sync(wrapped) if not sync else contextlib.nullcontext():
                with accelerator.autocast():
                    loss = _loss(wrapped, teacher, ids, config) / accumulation
                accelerator.backward(loss)
            total += float(loss.detach())
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = float(accelerator.reduce(torch.tensor(total, device=accelerator.device), "mean"))
        seconds = time.perf_counter() - tick
        point = {"step": step + 1, "loss": mean_loss, "lr": schedule.get_last_lr()[0],
                 "tokens_per_s": config.batch_size * config.seq_len / seconds, "seconds": seconds}  # fmt: skip
        result.curve.append(point)
        last = step + 1 == config.steps
        if config.eval_every and (step + 1) % config.eval_every == 0 and not last:
            result.evals.append(_evaluate(accelerator, wrapped, tokenizer, step + 1, config.eval_tokens))
        result.seconds = time.perf_counter() - began
        result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
        if checkpoint is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            if accelerator.is_main_process:
                _save_checkpoint(checkpoint, step + 1, accelerator.unwrap_model(wrapped), optimizer, schedule, result)
            accelerator.wait_for_everyone()
        if on_step is not None and accelerator.is_main_process:
            on_step({**point, "steps": config.steps, "eval": result.evals[-1]})
    result.evals.append(_evaluate(accelerator, wrapped, tokenizer, config.steps, config.eval_tokens))
    result.seconds = time.perf_counter() - began
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.requires_grad_(False)
    model.eval()
    return result


def _loss(model: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, config: HealConfig) -> torch.Tensor:
    """(1 - distill) * next-token loss + distill * distillation loss on one micro-batch (rows of token ids)."""
    output = model(input_ids=ids, labels=ids, use_cache=False)
    if not config.distill:
        return output.loss
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
    kd = distillation_loss(output.logits[:, :-1], teacher_logits[:, :-1], config.temperature)
    return (1 - config.distill) * output.loss + config.distill * kd


def _evaluate(accelerator, model: nn.Module, tokenizer, step: int, tokens: int) -> dict:
    """Held-out perplexity (context 512, stride 256) on the main process; the others wait."""
    from .corpus import split_text
    from .perplexity import perplexity

    result = {}
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(model)
        net.eval()
        ppl = perplexity(net, tokenizer, split_text("heldout", genres="a"), context=512, stride=256, max_tokens=tokens)
        result = {"step": step, **ppl.to_dict()}
    accelerator.wait_for_everyone()
    return result


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: two moments per trained entry, plus step counts)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def _save_checkpoint(path: Path, step: int, model: nn.Module, optimizer, schedule, result: HealResult) -> None:
    """Trainable weights, optimizer, schedule and curve, written to a temp file and renamed (never half a file)."""
    state = {
        "step": step,
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "result": result.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: nn.Module, optimizer, schedule) -> tuple[int, HealResult]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = [n for n in state["trainable"] if n not in params]
    if missing:
        raise ValueError(
            f"checkpoint {path} holds {missing[:2]}, which this model lacks: was it made for another model?"
        )
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["step"], HealResult(**state["result"])
