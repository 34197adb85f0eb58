"""Healing: a short retraining of a compressed model so its layers adapt to each other (CompactifAI's step 3).

Next-token loss on the corpus's train split, optionally mixed with distillation from the original model
(KL between temperature-softened distributions, Hinton et al. 2015) and/or a pull of each block's output toward the
original's (intermediate-layer distillation, TinyBERT-style). AdamW with linear warm-up and cosine decay,
gradient accumulation and clipping, optional gradient checkpointing, bf16 autocast on a GPU. The MPO cores stay
cores: the layers' forward contracts them, so gradients and optimizer state are MPO-sized.

Runs on one process, or on several under ``torchrun``/``accelerate launch`` (DDP through accelerate, or with
``fsdp`` PyTorch's FSDP2 ``fully_shard``, which shards weights, gradients and optimizer state over the processes for
models that do not fit one device): the global batch of each step is the same whatever the number of processes, so
curves compare. Every ``checkpoint_every``
steps the trainable state, optimizer, schedule and curve are written atomically; ``resume`` continues from
there and ends exactly where an uninterrupted run of the same seed would (the data order is a function of the step).

Quantization-aware (``quant_bits``, ``quant_pending``): the weights that will be packed train through their
rounding (:mod:`bondcut.quant.aware`) and are packed when training ends, so packing loses nothing afterwards.
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
from .surgery import is_dense_layer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


TRAIN_CHOICES = ("mpo", "all", "scales", "mpo+scales", "mpo+dense")
GAUGE_CHOICES = ("balanced", "canonical")


@dataclass
class HealConfig:
    """How to heal.

    Attributes:
        tokens: training tokens in total (global batch x seq_len x steps); say how this compares to one pass.
        seq_len: tokens per training sequence.
        batch_size: sequences per optimizer step, over all processes and accumulation micro-steps.
        micro_batch: sequences per forward/backward on one process (accumulation = batch / (micro x processes)).
        lr: peak learning rate; warmup: fraction of steps warming up linearly; min_lr_ratio: cosine floor.
        rest_lr: with train="all", the peak learning rate of everything outside the MPO layers (embeddings, norms,
            dense layers); None = ``lr``. Pretrained dense weights want a smaller step than freshly cut cores.
        weight_decay, max_grad_norm: AdamW weight decay and gradient-norm clip.
        train: "mpo" (MPO cores and their biases only), "all" parameters, "scales": a packed model's per-group
            scales and offsets only (codes fixed; healing after packing; stored back as fp16 when done), or
            "mpo+scales": both, for a model whose MPO layers are float and the rest packed; "mpo+dense": the MPO
            cores and the block matrices the plan kept dense (every linear layer but the output embedding; the
            embeddings and norms stay), so the layers left whole adapt to their cut neighbours too.
        distill: weight of the distillation term (0 = next-token loss only, 1 = distillation only); needs a teacher.
        temperature: softening of both distributions in the distillation term.
        teacher_top_k: 0 runs the teacher beside the student on every batch; k > 0 caches its k largest logits per
            position on disk (``teacher_cache``), so later runs on the same data never run the teacher.
        hidden_distill: weight of a hidden-state term added to the loss (0 = none; needs a teacher with as many
            blocks): each block's output is pulled toward the teacher's, as the mean over blocks and positions of
            ||h_student - h_teacher||^2 / ||h_teacher||^2 (TinyBERT-style intermediate-layer distillation; per
            position, so the first token's outsized activations do not dominate). The teacher runs on every batch.
        eval_every: steps between held-out perplexity measurements (0 = only before and after).
        eval_tokens: held-out tokens scored each time (context 512, stride 256); 0 = no held-out checks at all
            (for callers that score the model themselves, as ``compare`` does before and after healing).
        checkpoint_every: steps between checkpoints (0 = none).
        gradient_checkpointing: recompute activations in backward (less memory, ~30 % more time).
        fsdp: under several processes, shard with FSDP2 (per transformer block, then the rest) instead of DDP.
        seed: data order and any randomness.
        first_batch: batches of the seeded order to skip, so a heal that continues a pass an earlier one began
            (compression in stages, healing after each) trains on new sequences, not the same first ones again.
        gauge: "canonical" trains the cores as decomposed (TT-SVD's left-canonical gauge: all the singular values
            in the last core); "balanced" regauges every MPO layer first so each bond index weighs the same on both
            of its cores (the operator is unchanged; :mod:`bondcut.mpo.gauge`): measured ahead early in a pass but
            behind at its end (README, healing section).
        quant_bits: 0 trains float weights; 8, 4, 3 or 2 trains the MPO cores (with train="all", also every dense layer,
            the embedding and the head) through the rounding packing will apply (group-wise, ``quant_group`` entries
            per fp16 scale and offset; straight-through gradients, :mod:`bondcut.quant.aware`) and packs them when
            done, so the healed model is stored at that width without a lossy packing step.
        quant_pending: for a model compressed with ``target_bytes`` and ``defer_packing`` (the joint search's float
            model): pack its dense layers and embedding first, as its plan says, then train the MPO cores through
            the rounding the plan gives each of them (its bits, its group size) and pack them when done.
    """

    tokens: int = 262_144
    seq_len: int = 256
    batch_size: int = 8
    micro_batch: int = 4
    lr: float = 1e-4
    rest_lr: float | None = None
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train: str = "mpo"
    distill: float = 0.0
    temperature: float = 1.0
    teacher_top_k: int = 0
    hidden_distill: float = 0.0
    eval_every: int = 0
    eval_tokens: int = 4096
    checkpoint_every: int = 0
    gradient_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 0
    first_batch: int = 0
    gauge: str = "canonical"
    quant_bits: int = 0
    quant_group: int = 64
    quant_pending: bool = False

    def __post_init__(self) -> None:
        if self.train not in TRAIN_CHOICES:
            raise ValueError(f"train must be 'mpo' (cores only), 'mpo+dense' (cores and dense linear layers), 'all', "
                             f"'scales' (a packed model's group scales and offsets) or 'mpo+scales', "
                             f"got {self.train!r}")  # fmt: skip
        if self.teacher_top_k < 0:
            raise ValueError(f"teacher_top_k must be >= 0 (0 = run the teacher alongside), got {self.teacher_top_k}")
        if not 0 <= self.distill <= 1 or self.temperature <= 0:
            raise ValueError(f"distill must be in [0, 1] and temperature > 0, got {self.distill}, {self.temperature}")
        if self.hidden_distill < 0:
            raise ValueError(f"hidden_distill must be >= 0 (0 = no hidden-state term), got {self.hidden_distill}")
        if self.hidden_distill and self.teacher_top_k:
            raise ValueError("hidden_distill runs the teacher on every batch (its hidden states are not cached), "
                             "so teacher_top_k's logit cache does not apply: set teacher_top_k=0 "
                             "(--teacher-top-k 0)")  # fmt: skip
        if self.rest_lr is not None and (self.rest_lr <= 0 or self.train not in ("all", "mpo+scales", "mpo+dense")):
            raise ValueError(f"rest_lr must be positive and only applies with train='all', 'mpo+scales' or "
                             f"'mpo+dense' (it sets the learning rate of what is not an MPO core), "
                             f"got rest_lr={self.rest_lr}, train={self.train!r}")  # fmt: skip
        if self.gauge not in GAUGE_CHOICES:
            raise ValueError(f"gauge must be one of {GAUGE_CHOICES}, got {self.gauge!r}")
        if self.quant_bits and self.quant_pending:
            raise ValueError("quant_bits rounds every core to one width and quant_pending to the widths of the "
                             "model's pending plan: choose one")  # fmt: skip
        if self.quant_bits:
            from .quant.packing import check_bits

            check_bits(self.quant_bits, self.quant_group)
        if (self.quant_bits or self.quant_pending) and (self.train == "scales" or self.fsdp):
            raise ValueError("quantization-aware healing (quant_bits, quant_pending) trains float MPO cores on one "
                             "grid per core: it does not combine with train='scales' or fsdp")  # fmt: skip
        if self.quant_pending and self.train in ("all", "mpo+dense"):
            raise ValueError(f"quant_pending packs the dense layers and embedding before training: train 'mpo' "
                             f"(cores) or 'mpo+scales' (cores and the packed layers' scales), not "
                             f"{self.train!r}")  # fmt: skip
        if self.eval_tokens < 0 or self.eval_tokens == 1:
            raise ValueError(f"eval_tokens must be 0 (no held-out checks) or >= 2 (a perplexity needs a predicted "
                             f"token), got {self.eval_tokens}")  # fmt: skip
        if self.first_batch < 0:
            raise ValueError(f"first_batch must be >= 0 (batches of the data order to skip), got {self.first_batch}")
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
    """Mark and return what trains: "all" parameters, "mpo" (only the MPO layers' cores and biases), "scales"
    (packed layers' group scales and offsets, through a gain and a shift per group), "mpo+scales" (both),
    "mpo+dense" (the cores and every dense linear layer but the output embedding), or "auto" ("mpo" for a model
    with MPO layers, "all" otherwise: what healing or fine-tuning would train)."""
    if train == "auto":
        train = "mpo" if any(isinstance(m, MPOLinear) for m in model.modules()) else "all"
    if train == "all":
        model.requires_grad_(True)
    else:
        from .quant.modules import PACKED_LAYERS, ranges_to_parameters

        model.requires_grad_(False)
        parts = train.split("+")
        output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for module in model.modules():
            if "dense" in parts and is_dense_layer(module) and module is not output_embedding:
                module.requires_grad_(True)
            if "mpo" in parts and isinstance(module, MPOLinear):
                module.requires_grad_(True)
            if "scales" in parts and isinstance(module, PACKED_LAYERS):
                ranges_to_parameters(module)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train='scales' needs a packed model: bondcut quantize it first (or heal with 'mpo')"
                         if train == "scales" else
                         "the model has no MPO layers to train; compress it first, or heal with train='all'")  # fmt: skip
    return params


def parameter_groups(model: nn.Module, params: list[nn.Parameter], config: HealConfig) -> list[dict]:
    """The optimizer's groups: one at ``lr``, or with ``rest_lr`` set, MPO cores at ``lr`` and the rest at
    ``rest_lr`` (the cosine schedule scales both alike)."""
    if config.rest_lr is None:
        return [{"params": params, "lr": config.lr}]
    in_mpo = {id(p) for m in model.modules() if isinstance(m, MPOLinear) for p in m.parameters()}
    cores = [p for p in params if id(p) in in_mpo]
    rest = [p for p in params if id(p) not in in_mpo]
    return [group for group in ({"params": cores, "lr": config.lr}, {"params": rest, "lr": config.rest_lr})
            if group["params"]]  # fmt: skip


def store_trained_ranges(model: nn.Module) -> None:
    """After healing with train='scales': the trained scales and offsets become fp16 buffers again."""
    from .quant.modules import PACKED_LAYERS, ranges_to_buffers

    for module in model.modules():
        if isinstance(module, PACKED_LAYERS):
            ranges_to_buffers(module)


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

    if (config.distill > 0 or config.hidden_distill > 0) and teacher is None:
        raise ValueError("distill > 0 and hidden_distill > 0 need the original model as teacher (CLI: --teacher "
                         "ORIGINAL)")  # fmt: skip
    if config.hidden_distill:
        _check_same_depth(model, teacher)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % (config.micro_batch * world):
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of micro_batch x processes "
                         f"({config.micro_batch} x {world})")  # fmt: skip
    accumulation = config.batch_size // (config.micro_batch * world)
    stream = SequenceStream(split_token_ids(tokenizer, "train"), config.seq_len, config.batch_size, config.seed,
                            config.first_batch)  # fmt: skip
    planned = None  # a deferred joint model: its dense part is packed now, its cores' planned widths come back
    if config.quant_pending:
        from .joint import pack_pending_except_cores

        planned = pack_pending_except_cores(model, tokenizer)
    params = trainable_parameters(model, config.train)
    if config.gauge == "balanced":
        for module in model.modules():
            if isinstance(module, MPOLinear):
                module.balance_gauge()
    rounding = _round_while_training(model, config, planned)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sharded = config.fsdp and world > 1
    if sharded:
        shard(model, accelerator.device)
        params = [p for p in model.parameters() if p.requires_grad]  # now DTensor shards
    optimizer = torch.optim.AdamW(parameter_groups(model, params, config), lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup, config.min_lr_ratio)
    )
    cache = None
    if teacher is not None:
        teacher.requires_grad_(False).eval()
        teacher.to(accelerator.device)
        if config.teacher_top_k and config.distill:
            cache = _open_cache(accelerator, teacher, stream, config.teacher_top_k)
    wrapped, optimizer = (model, optimizer) if sharded else accelerator.prepare(model, optimizer)
    result = HealResult(asdict(config), config.steps, world, sum(p.numel() for p in params), 0, stream.tokens_per_pass)
    start_step = 0
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT
    if resume and checkpoint is not None and checkpoint.exists():
        start_step, result = _load_checkpoint(checkpoint, accelerator.unwrap_model(wrapped), optimizer, schedule)
        result.processes = world  # the checkpoint may come from a run on another number of processes
        log.info("resumed at step %d from %s", start_step, checkpoint)
    elif config.eval_tokens:
        result.evals.append(_evaluate(accelerator, wrapped, tokenizer, 0, config.eval_tokens, sharded))
    began = time.perf_counter() - result.seconds
    for step in range(start_step, config.steps):
        tick = time.perf_counter()
        wrapped.train()
        indices = stream.rows(step, rank, world)
        rows = stream.sequences[indices].to(accelerator.device)  # (batch / world, seq_len)
        total = next_token = 0.0
        for micro in range(accumulation):
            part = slice(micro * config.micro_batch, (micro + 1) * config.micro_batch)
            ids = rows[part]
            sync = micro == accumulation - 1
            target = teacher if cache is None else cache.top_logits(indices[part], ids)
            with _gradient_sync(accelerator, wrapped, sync, sharded):
                with accelerator.autocast():
                    loss, lm_loss = _loss(wrapped, target, ids, config)
                    loss = loss / accumulation
                accelerator.backward(loss)
            step_loss, step_lm = torch.stack([loss.detach(), lm_loss / accumulation]).tolist()  # one device sync
            total += step_loss
            next_token += step_lm
        if config.max_grad_norm:
            clip = torch.nn.utils.clip_grad_norm_ if sharded else accelerator.clip_grad_norm_
            clip(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss, mean_lm = accelerator.reduce(torch.tensor([total, next_token], device=accelerator.device), "mean")
        seconds = time.perf_counter() - tick
        point = {"step": step + 1, "loss": float(mean_loss), "lm_loss": float(mean_lm),
                 "lr": schedule.get_last_lr()[0], "tokens_per_s": config.batch_size * config.seq_len / seconds,
                 "seconds": seconds}  # fmt: skip
        result.curve.append(point)
        last = step + 1 == config.steps
        if config.eval_tokens and config.eval_every and (step + 1) % config.eval_every == 0 and not last:
            result.evals.append(_evaluate(accelerator, wrapped, tokenizer, step + 1, config.eval_tokens, sharded))
        result.seconds = time.perf_counter() - began
        result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
        if checkpoint is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            state = _training_state(accelerator.unwrap_model(wrapped), optimizer, schedule, step + 1, result)
            if accelerator.is_main_process:
                _save_checkpoint(checkpoint, state)
            accelerator.wait_for_everyone()
        if on_step is not None and accelerator.is_main_process:
            on_step({**point, "steps": config.steps, "eval": result.evals[-1] if result.evals else {}})
    store_trained_ranges(model)  # before the last evaluation: it scores the fp16 scales and offsets that are saved
    if config.eval_tokens:
        result.evals.append(_evaluate(accelerator, wrapped, tokenizer, config.steps, config.eval_tokens, sharded))
    result.seconds = time.perf_counter() - began
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.requires_grad_(False)
    if rounding:  # the last evaluation saw the rounded weights: packing them changes nothing
        from .quant.aware import pack_quant_aware

        pack_quant_aware(model, config.quant_bits or None, config.quant_group)
    if config.quant_pending:
        from .hf_integration import attach_layout_config

        attach_layout_config(model, pending_packing=None)  # all of it is packed now
    model.eval()
    return result


def _round_while_training(model: nn.Module, config: HealConfig, planned: tuple[dict, int] | None) -> bool:
    """Quantization-aware healing: make the weights train through their rounding (every core at ``quant_bits``,
    and the rest with train='all'; or each core at its planned width). Whether anything is rounded."""
    from .quant.aware import make_quant_aware

    if config.quant_bits:
        make_quant_aware(model, config.quant_bits, config.quant_group, rest=config.train == "all")
        return True
    if planned is not None and planned[0]:
        make_quant_aware(model, *planned)
        return True
    return False


def _open_cache(accelerator, teacher: nn.Module, stream, k: int):
    """The teacher's top-k cache for this stream's sequences; the main process creates its files first."""
    from .teacher_cache import TeacherCache

    if accelerator.is_main_process:
        cache = TeacherCache(teacher, stream.sequences, k)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        cache = TeacherCache(teacher, stream.sequences, k)
    return cache


def _loss(model: nn.Module, teacher, ids: torch.Tensor, config: HealConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - distill) * next-token loss + distill * distillation loss + hidden_distill * hidden-state loss on one
    micro-batch (rows of token ids), and the next-token loss alone, detached (so runs with other mixes compare).

    ``teacher`` is the teacher model, or its cached (top-k values, token ids) for these rows."""
    from .teacher_cache import sparse_distillation_loss

    hidden = bool(config.hidden_distill)
    output = model(input_ids=ids, labels=ids, use_cache=False, output_hidden_states=hidden)
    next_token = output.loss.detach()
    if not (config.distill or hidden):
        return output.loss, next_token
    if isinstance(teacher, tuple):
        values, indices = (t.to(ids.device) for t in teacher)
        kd = sparse_distillation_loss(output.logits[:, :-1], values[:, :-1], indices[:, :-1], config.temperature)
        return (1 - config.distill) * output.loss + config.distill * kd, next_token
    with torch.no_grad():
        reference = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    loss = output.loss
    if config.distill:
        kd = distillation_loss(output.logits[:, :-1], reference.logits[:, :-1], config.temperature)
        loss = (1 - config.distill) * loss + config.distill * kd
    if hidden:
        loss = loss + config.hidden_distill * hidden_state_loss(output.hidden_states, reference.hidden_states)
    return loss, next_token


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over blocks and positions of ||h_s - h_t||^2 / ||h_t||^2 (each (batch, seq, hidden)). The first entry
    (the embedding's output, before any block) is skipped: compression does not touch it."""
    if len(student) != len(teacher):
        raise ValueError(f"hidden-state distillation needs as many hidden states in student and teacher, got "
                         f"{len(student)} and {len(teacher)}")  # fmt: skip
    terms = []
    for mine, theirs in zip(student[1:], teacher[1:], strict=True):
        theirs = theirs.float()
        error = (mine.float() - theirs).pow(2).sum(-1)  # (batch, seq)
        terms.append((error / theirs.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(terms).mean()


def _check_same_depth(model: nn.Module, teacher: nn.Module) -> None:
    """Hidden-state distillation pairs block i with block i: a model with deleted blocks cannot take it."""
    mine, theirs = model.config.num_hidden_layers, teacher.config.num_hidden_layers
    if mine != theirs:
        raise ValueError(f"hidden_distill pairs each block's output with the teacher's, but the model has {mine} "
                         f"blocks and the teacher {theirs} (blocks were deleted?): heal without --hidden-distill, "
                         f"or use logit distillation (--distill)")  # fmt: skip


def shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: each transformer block (``model._no_split_modules``) is one shard group, the rest another.

    Each parameter is split along its longest dimension, not FSDP's default first one: an MPO's end cores have a
    bond of 1 there, which would leave one process holding them whole. MPO layers then run their differentiable
    contraction even in evaluation: FSDP gathers the cores anew for each forward, so cached step matrices would
    go stale.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def longest_dimension(param: nn.Parameter) -> Shard:
        return Shard(max(range(param.dim()), key=lambda d: param.shape[d]))

    model.to(device)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if isinstance(module, MPOLinear):
            module.cache_inference = False
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, shard_placement_fn=longest_dimension)
    fully_shard(model, shard_placement_fn=longest_dimension)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every process calls this (it gathers); the main process gets the whole state dict on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _gradient_sync(accelerator, model: nn.Module, sync: bool, sharded: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on accumulation micro-steps but the last."""
    if sharded:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def _evaluate(accelerator, model: nn.Module, tokenizer, step: int, tokens: int, sharded: bool = False) -> dict:
    """Held-out perplexity (context 512, stride 256) on the main process; the others wait (or, sharded, take part
    in every forward and drop the figure)."""
    from .perplexity import heldout_perplexity

    result = {}
    if sharded or accelerator.is_main_process:
        net = model if sharded else accelerator.unwrap_model(model)
        net.eval()
        ppl = heldout_perplexity(net, tokenizer, max_tokens=tokens)
        result = {"step": step, **ppl.to_dict()} if accelerator.is_main_process else {}
    if not sharded:
        accelerator.wait_for_everyone()
    return result


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors held by this process (AdamW: two moments per trained entry, plus step
    counts); under FSDP, this process's shards."""
    from torch.distributed.tensor import DTensor

    local = (t.to_local() if isinstance(t, DTensor) else t for s in optimizer.state.values() for t in s.values())
    return sum(t.numel() * t.element_size() for t in local if torch.is_tensor(t))


def _training_state(model: nn.Module, optimizer, schedule, step: int, result: HealResult) -> dict:
    """What a checkpoint holds, gathered whole (every process calls this when sharded): trainable weights by name,
    the optimizer state by parameter name (the same layout with or without FSDP), the schedule and the curve."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    options = StateDictOptions(full_state_dict=True, cpu_offload=torch.distributed.is_initialized())
    trainable = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if isinstance(param, DTensor) else param
            trainable[name] = value.detach().cpu().clone()
    return {
        "step": step,
        "trainable": trainable,
        "optimizer": get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options),
        "schedule": schedule.state_dict(),
        "result": result.to_dict(),
    }


def _save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temp file and renamed: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: nn.Module, optimizer, schedule) -> tuple[int, HealResult]:
    """Every process reads the file; sharded models take their own shards of it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = torch.load(path, map_location="cpu", weights_only=False)
    names = {n for n, _ in model.named_parameters()}
    missing = [n for n in state["trainable"] if n not in names]
    if missing:
        raise ValueError(
            f"checkpoint {path} holds {missing[:2]}, which this model lacks: was it made for another model?"
        )
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state["trainable"], options=options)
    raw = getattr(optimizer, "optimizer", optimizer)
    if isinstance(state["optimizer"]["param_groups"][0]["params"][0], int):
        raw.load_state_dict(state["optimizer"])  # checkpoints written before the by-name layout
    else:
        set_optimizer_state_dict(model, raw, state["optimizer"], options=options)
    schedule.load_state_dict(state["schedule"])
    return state["step"], HealResult(**state["result"])
