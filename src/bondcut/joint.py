"""One budget, one search: bytes on disk shared among MPO layouts and χ, packed precision, and whole blocks.

Per SA/MLP matrix the options are every priced (layout, χ) of :mod:`bondcut.candidates` and dense, each stored
in the model's float dtype or packed at one of the widths asked (8 and 4 by default; 3 and 2 as well,
:mod:`bondcut.quant`). Per model, the token embedding (and the LM head) is float or packed at one of those widths,
or, tied to the head, in row tiers (:mod:`bondcut.quant.tiers`: the rows used most at a finer width), and up to
``max_blocks`` decoder blocks may be deleted (LayerChop).

Predicted damage, in nats of KL to the original per token, adds up:
- a matrix option: alpha_l * e, with alpha_l fitted to the profile (:mod:`bondcut.allocate`) and e its relative
  output error. Packing adds its own output error: measured exactly for a dense matrix, rounded as the plan
  will round it (GPTQ or to nearest; one product with the whitened inputs), and for MPO cores taken as (number of
  cores) x that of the dense matrix rounded to nearest at the same bits (cores are rounded to nearest; each core's
  rounding adds a relative error of about the same size);
- the embedding's precision: its KL measured directly on the unseen calibration tokens the search measures on;
- deleting k blocks: the KL measured when the greedy LayerChop order removes them (:func:`choose_blocks`).
Rounding damage (packing errors and the embedding's KL) is weighted by ``rounding_weight`` against truncation's:
1 predicts the KL of the model as packed; a model healed afterwards keeps less of its rounding damage
(:data:`HEALED_ROUNDING_WEIGHT`).
For every k in 0..max_blocks, the exact multiple-choice knapsack (in bytes) picks the matrices' options and
the embedding's precision; the k with the least predicted total wins. With a stated number of evaluations,
that plan and every single-technique plan that fits (all matrices and the embedding packed to one width,
:func:`uniform_plans`) are measured first and the search starts from the best (:func:`best_measured_start`): the
predictions can rank a fitted plan above plain packing that measures better. :func:`refine_joint` then moves
matrices between their options on measured KL (an evolutionary search, as :mod:`bondcut.search` does for a
parameter budget): the sum of single-matrix predictions misses how damages combine, and the measurement does not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .allocate import LayerChoice, Plan, choice_of
from .candidates import MatrixCandidates, Option
from .config import check_objective
from .divergence import kl_per_position, next_token_logprobs
from .knapsack import solve_knapsack

EMBEDDING = "<embedding>"  # the knapsack item of the token embedding (and the LM head)

HEALED_ROUNDING_WEIGHT = 0.3
"""Rounding damage's weight against truncation's when planning for a healed model. Measured on SmolLM2-135M healed
on 131,072 tokens (bench/results/issue7/joint_vs_int4_g128_size.json): healing keeps about 0.27 of the
log-perplexity damage int4 rounding does (the scales train) and about 0.89 of what low rank does."""


def bytes_per_weight(bits: int | None, float_bytes: int, group_size: int) -> float:
    """Stored bytes per weight entry: the float dtype, or packed codes plus an fp16 scale and offset per group."""
    return float(float_bytes) if bits is None else (bits + 32 / group_size) / 8


def parse_bytes(text: str | int) -> int:
    """'30MB' -> 30_000_000, '1.5GiB' -> 1.5 * 2**30, '12345' -> 12345 (decimal and binary units)."""
    if isinstance(text, int):
        return text
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    raw = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if raw.endswith(unit):
            number, scale = raw[: -len(unit)], units[unit]
            break
    else:
        number, scale = raw, 1
    try:
        value = float(number) * scale
    except ValueError:
        value = -1
    if value <= 0:
        raise ValueError(f"a size must be a positive number of bytes such as 30MB, 120MiB or 31457280, got {text!r}")
    return int(value)


def parse_budget(text: str | int) -> int | str:
    """A joint-search budget: bytes ('30MB', '120MiB', 31457280), or a share of the model's fp32 weight bytes
    ('10%': "90 % smaller"), kept as normalized text until the model is known (:func:`budget_bytes`)."""
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share < 100:
            raise ValueError(f"a share of the fp32 weights must be a percentage between 0 and 100 such as 10%, "
                             f"got {text!r}")  # fmt: skip
        return f"{share:g}%"
    return parse_bytes(text)


def budget_bytes(target: int | str, model: nn.Module) -> int:
    """The joint search's budget in bytes: ``target`` itself, or its share ('10%') of ``model``'s weights in fp32."""
    from .sizes import fp32_weight_bytes

    if isinstance(target, str):
        return int(float(target[:-1]) / 100 * fp32_weight_bytes(model))
    return int(target)


@dataclass
class JointPlan:
    """The joint allocation: per-matrix choices (with bits), deleted blocks, the embedding's precision."""

    plan: Plan
    removed_blocks: list[int]
    embedding_bits: int | str | None  # a width, row tiers ("8:0.1,4:0.9", :mod:`bondcut.quant.tiers`), or float
    budget_bytes: int
    predicted_bytes: int
    predicted_kl: float
    group_size: int
    by_deletions: list[dict] = field(default_factory=list)  # k -> predicted KL and bytes, the outer search
    row_usage: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """How row tiers ranked the embedding's rows when the plan was measured (packing ranks them alike); not saved."""

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(replace(self, row_usage=None)).items() if k != "row_usage"}
        return {**data, "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> JointPlan:
        return cls(**{**data, "plan": Plan.from_dict(data["plan"])})


def packed_bytes(entry: MatrixCandidates, option: Option, bits: int, group_size: int, float_bytes: int) -> int:
    """Bytes ``option`` of ``entry`` takes packed to ``bits`` in groups of ``group_size`` (a dense matrix in the
    groups its rows are stored in, ``entry.dense_groups``)."""
    stored_group = entry.dense_groups[group_size] if option.layout == "dense" else group_size
    return math.ceil(option.params * bytes_per_weight(bits, float_bytes, stored_group))


def priced_options(
    entry: MatrixCandidates, float_bytes: int, group_size: int, rounding_weight: float = 1.0
) -> list[Option]:
    """Every option at every precision (packed in groups of ``group_size``), priced in bytes, keeping only those
    no other beats on bytes and error.

    A packed dense matrix adds its measured packing error (``entry.dense_packing_errors``: as the plan rounds
    it) and is priced in the groups it is stored in (``entry.dense_groups``); packed cores add (number of cores)
    x the dense matrix's error rounded to nearest, as cores are. Packing errors count ``rounding_weight`` times."""
    options = []
    for option in entry.options:
        options.append(replace(option, nbytes=math.ceil(option.params * float_bytes)))
        for (bits, group), nearest in entry.packing_errors.items():
            if group != group_size:
                continue
            if option.layout == "dense":
                delta = entry.dense_packing_errors[bits, group]
            else:
                delta = len(entry.spectra[option.layout].layout) * nearest
            nbytes = packed_bytes(entry, option, bits, group, float_bytes)
            options.append(replace(option, bits=bits, error=option.error + rounding_weight * delta, nbytes=nbytes))
    frontier: list[Option] = []
    for option in sorted(options, key=lambda o: (o.nbytes, o.error)):
        if not frontier or option.error < frontier[-1].error:
            frontier.append(option)
    return frontier


def precision_text(precision: int | str | None) -> str:
    """An embedding precision as tables print it: 'float', '4 bits' or 'rows 8:0.1,4:0.9'."""
    if precision is None:
        return "float"
    return f"rows {precision}" if isinstance(precision, str) else f"{precision} bits"


@dataclass(frozen=True)
class EmbeddingRounding:
    """How packing will round the embedding (and an untied head), so that pricing and every measurement round it
    alike: GPTQ on ``gram``, the tied head's input Gram matrix (None: to nearest), rows rotated with ``rotate``
    (:func:`bondcut.quant.apply.rounded_table`), row tiers ranked by ``usage``
    (:func:`bondcut.quant.tiers.corpus_usage`). Computed once per search: the Gram matrix and the usage cost a pass
    each; each width's rounded table is kept for the table it was rounded from (tiers and plans reuse it)."""

    gram: torch.Tensor | None = None
    rotate: bool = False
    usage: torch.Tensor | None = None
    _rounded: dict = field(default_factory=dict, compare=False, repr=False)

    def table(self, weight: torch.Tensor, precision: int | str, group_size: int) -> torch.Tensor:
        """``weight`` as a lookup will read it once packed at ``precision`` (a width or row tiers)."""
        from .quant.tiers import RowTiers, tiered_values

        if not isinstance(precision, str):
            return self._rounded_at(weight, precision, group_size)
        if self.usage is None:
            raise ValueError("row tiers rank the embedding's rows by use: give EmbeddingRounding a usage")
        tiers = RowTiers.parse(precision)
        tables = {b: self._rounded_at(weight, b, group_size) for b in tiers.widths}
        return tiered_values(tables, tiers.assign(self.usage), tiers)

    def _rounded_at(self, weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        from .quant.apply import rounded_table

        key = (bits, group_size, tuple(weight.shape), float(weight.detach().double().sum()))
        if key not in self._rounded:
            self._rounded[key] = rounded_table(weight, bits, group_size, self.gram, self.rotate)
        return self._rounded[key]


@torch.no_grad()
def embedding_kls(model: nn.Module, windows: torch.Tensor, bits: tuple[int | str, ...], group_size: int,
                  rounding: EmbeddingRounding = EmbeddingRounding(),
                  reference: torch.Tensor | None = None) -> dict[int | str, float]:  # fmt: skip
    """KL to the original per token when the embedding (and an untied head) is rounded to each precision (a bit
    width, or row tiers for a tied table) as packing will round it (``rounding``); ``reference`` is the original's
    :func:`next_token_logprobs` on ``windows`` (None: computed here; pass it when pricing several group sizes)."""
    tensors = {id(p): p for p in embedding_tensors(model)}
    if reference is None:
        reference = next_token_logprobs(model, windows)
    out = {}
    for b in bits:
        saved = {k: p.detach().clone() for k, p in tensors.items()}
        for p in tensors.values():
            p.copy_(rounding.table(p, b, group_size))
        try:
            out[b] = float(kl_per_position(reference, next_token_logprobs(model, windows)).mean())
        finally:
            for k, p in tensors.items():
                p.copy_(saved[k])
    return out


def tied_head_gram(model: nn.Module, tokenizer, tokens: int) -> torch.Tensor | None:
    """The input Gram matrix of a tied LM head on ``tokens`` calibration tokens (what GPTQ rounds a tied
    embedding for); None when the head is not tied."""
    from .calibration import input_covariances
    from .surgery import name_of

    head = model.get_output_embeddings()
    if head is None or head.weight is not model.get_input_embeddings().weight:
        return None
    head_name = name_of(model, head)
    return input_covariances(model, tokenizer, [head_name], tokens=tokens)[0][head_name]


def _embedding_prices(
    tensors: list[torch.Tensor], float_bytes: int, group_size: int, kls: dict[int | str, float]
) -> dict[int | str | None, tuple[int, float]]:
    """The embedding's knapsack item: precision (bits, or row tiers of a tied table) -> (bytes, KL); packed rows
    are cut in the largest group <= ``group_size`` that divides them and fills whole bytes (as
    :func:`bondcut.quant.quantize_model` packs it)."""
    from .quant.tiers import RowTiers

    prices: dict[int | str | None, tuple[int, float]] = {None: (sum(p.numel() for p in tensors) * float_bytes, 0.0)}
    for precision, kl in kls.items():  # one width is a single tier (no tier index)
        tiers = RowTiers.parse(precision) if isinstance(precision, str) else RowTiers(((precision, 1.0),))
        prices[precision] = (sum(tiers.nbytes(*p.shape, group_size) for p in tensors), kl)
    return prices


def embedding_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The embedding's weight and an untied head's (a tied head shares the embedding's: listed once)."""
    head = model.get_output_embeddings()
    tensors = (model.get_input_embeddings().weight, None if head is None else head.weight)
    return list({id(p): p for p in tensors if p is not None}.values())


def solve_joint(
    options: dict[str, list[Option]],
    alphas: dict[str, float],
    embedding: dict[int | str | None, tuple[int, float]],
    block_of: dict[str, int],
    deletion_order: list[int],
    deletion_kls: list[float],
    block_fixed_bytes: dict[int, int],
    budget_bytes: int,
    fixed_bytes: int,
    on_solve: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Option], int | str | None, list[int], dict]:
    """The knapsack per number of deleted blocks; the best total. ``embedding``: precision -> (bytes, KL)."""
    best, trials = None, []
    embedding_bits = list(embedding)
    for k in range(len(deletion_order) + 1):
        gone = set(deletion_order[:k])
        names = [n for n in options if block_of[n] not in gone]
        budget = budget_bytes - fixed_bytes + sum(block_fixed_bytes[b] for b in gone)
        sizes = [[o.nbytes for o in options[n]] for n in names] + [[embedding[b][0] for b in embedding_bits]]
        costs = [[alphas[n] * o.error for o in options[n]] for n in names] + [[embedding[b][1] for b in embedding_bits]]
        base = deletion_kls[k - 1] if k else 0.0
        try:
            picks = solve_knapsack(sizes, costs, budget)
        except ValueError:
            trials.append({"deleted": k, "feasible": False})
            continue
        total = base + sum(costs[i][p] for i, p in enumerate(picks))
        used = fixed_bytes - sum(block_fixed_bytes[b] for b in gone) + sum(sizes[i][p] for i, p in enumerate(picks))
        trials.append({"deleted": k, "feasible": True, "predicted_kl": total, "bytes": used})
        if best is None or total < best[0]:
            chosen = {n: options[n][p] for n, p in zip(names, picks)}
            best = (total, chosen, embedding_bits[picks[-1]], sorted(gone), used)
        if on_solve is not None:
            on_solve(k + 1, len(deletion_order) + 1)
    if best is None:
        raise ValueError(f"no way to fit {budget_bytes:,} bytes: even every matrix at its smallest option and the "
                         f"embedding at 4 bits exceed it (fixed parts alone: {fixed_bytes:,}); ask for more bytes")  # fmt: skip
    total, chosen, bits, gone, used = best
    return chosen, bits, gone, {"trials": trials, "predicted_kl": total, "bytes": used}


def joint_plan(
    candidates: dict[str, MatrixCandidates],
    alphas: dict[str, float],
    chosen: dict[str, Option],
    deleted: list[int],
    embedding_bits: int | str | None,
    budget_bytes: int,
    group_size: int,
    stats: dict,
    method: str = "joint-knapsack",
) -> JointPlan:
    """Wrap the solver's picks as a :class:`JointPlan` (matrices of deleted blocks are left out of the plan)."""
    layers: dict[str, LayerChoice] = {n: choice_of(candidates[n], o, alphas[n]) for n, o in chosen.items()}
    plan = Plan(layers=layers, budget=budget_bytes, method=method, predicted_loss=stats["predicted_kl"])
    return JointPlan(plan, deleted, embedding_bits, budget_bytes, stats["bytes"], stats["predicted_kl"], group_size,
                     stats["trials"])  # fmt: skip


def uniform_plans(
    candidates: dict[str, MatrixCandidates],
    alphas: dict[str, float],
    priced: dict[int, tuple[dict[str, list[Option]], dict[int | str | None, tuple[int, float]]]],
    bits: tuple[int, ...],
    budget: int,
    fixed_bytes: int,
    float_bytes: int,
) -> list[JointPlan]:
    """The single-technique plans within ``budget``: every matrix dense and packed to one width in one group size,
    no block deleted, the embedding at that width or in any of its row tiers (what ``bondcut quantize --bits b
    [--embedding-tiers T]`` stores). ``priced``: group size -> (each matrix's priced options, the embedding's
    precision -> (bytes, KL)). Where a smaller option has less error than a packed dense matrix (the frontier
    drops it), the largest option within its bytes stands in."""
    plans = []
    for group, (options, embedding) in priced.items():
        tiers = [p for p in embedding if isinstance(p, str)]
        for b in bits:
            chosen = {}
            for name, entry in candidates.items():
                dense = next(o for o in entry.options if o.layout == "dense")
                limit = packed_bytes(entry, dense, b, group, float_bytes)
                chosen[name] = max((o for o in options[name] if o.nbytes <= limit), key=lambda o: o.nbytes)
            matrix_bytes = fixed_bytes + sum(o.nbytes for o in chosen.values())
            matrix_kl = sum(alphas[n] * o.error for n, o in chosen.items())
            for precision in (b, *tiers):
                used = matrix_bytes + embedding[precision][0]
                if used > budget:
                    continue
                stats = {"predicted_kl": matrix_kl + embedding[precision][1], "bytes": used, "trials": []}
                method = f"uniform-int{b}" + ("" if precision == b else f"+rows-{precision}")
                plans.append(joint_plan(candidates, alphas, chosen, [], precision, budget, group, stats, method))
    return plans


def allocate_joint(
    model: nn.Module,
    tokenizer,
    candidates: dict[str, MatrixCandidates],
    config,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> JointPlan:
    """Measure what the joint solver needs (sensitivities, embedding KLs, block deletions), solve. The candidates
    carry their packing errors (``build_candidates(..., packing_bits=config.joint_bits,
    packing_rounding=config.joint_rounding)``)."""
    from .allocate import sensitivities
    from .calibration import unseen_calibration_windows
    from .layerchop import choose_blocks
    from .replay import block_list

    names = list(candidates)
    alphas, source = sensitivities(model, tokenizer, candidates, config, on_progress)
    float_bytes = next(model.parameters()).element_size()
    # priced on the text the search measures on: the head's GPTQ statistics have not seen it
    windows = unseen_calibration_windows(tokenizer, config.search_tokens, min(512, config.search_tokens))
    emb_tensors = embedding_tensors(model)
    blocks, index = block_list(model, names)
    block_of = {n: int(index.match(n).group(1)) for n in names}
    order, deletion_kls = [], []
    if config.max_deleted_blocks:
        order, deletion_kls = choose_blocks(model, tokenizer, min(config.max_deleted_blocks, len(blocks) - 1),
                                            rule="measured", calibration_tokens=config.search_tokens,
                                            context=min(512, config.search_tokens))  # fmt: skip
    target_ids = {id(p) for c in names for p in model.get_submodule(c).parameters()}
    emb_ids = {id(p) for p in emb_tensors}
    fixed = {id(p): p.numel() * p.element_size() for p in model.parameters() if id(p) not in target_ids | emb_ids}
    block_fixed = {i: sum(fixed.get(id(p), 0) for p in block.parameters()) for i, block in enumerate(blocks)}
    budget, fixed_bytes = budget_bytes(config.target_bytes, model), sum(fixed.values())
    best, by_group, priced, weight = None, {}, {}, config.rounding_weight
    gptq = config.joint_rounding == "gptq"
    head_gram = tied_head_gram(model, tokenizer, max(512, config.calibration_tokens or 0)) if gptq else None
    precisions, usage = embedding_precisions(model, tokenizer, config)
    rounding = EmbeddingRounding(head_gram, config.joint_rotate, usage)
    reference = next_token_logprobs(model, windows)
    for group in config.joint_group_sizes:
        options = {n: priced_options(c, float_bytes, group, weight) for n, c in candidates.items()}
        kls = embedding_kls(model, windows, precisions, group, rounding, reference)
        embedding = _embedding_prices(emb_tensors, float_bytes, group, {b: weight * kl for b, kl in kls.items()})
        priced[group] = (options, embedding)
        try:
            chosen, bits, gone, stats = solve_joint(options, alphas, embedding, block_of, order, deletion_kls,
                                                    block_fixed, budget, fixed_bytes)  # fmt: skip
        except ValueError as err:  # this group size cannot fit the budget; another may
            by_group[group], failure = None, err
            continue
        by_group[group] = stats["predicted_kl"]
        if best is None or stats["predicted_kl"] < best[0]["predicted_kl"]:
            best = (stats, chosen, bits, gone, group, kls, options)
    if best is None:
        raise failure
    stats, chosen, bits, gone, group, kls, options = best
    plan = joint_plan(candidates, alphas, chosen, gone, bits, budget, group, stats)
    starts = []
    if config.search_evaluations:
        measure = dict(tokens=config.search_tokens, rounding=rounding, objective=config.search_objective)
        rivals = uniform_plans(candidates, alphas, priced, tuple(config.joint_bits), budget, fixed_bytes, float_bytes)
        plan, starts = best_measured_start(model, tokenizer, [plan, *rivals], candidates, priced, **measure)
        on_eval = None if on_progress is None else lambda i, n: on_progress("search", i, n)
        plan = refine_joint(model, tokenizer, plan, candidates, alphas, priced[plan.group_size][0],
                            config.search_evaluations, on_eval=on_eval, **measure)  # fmt: skip
    plan.plan.search["starts"] = starts
    plan.plan.search["profile"] = source
    plan.plan.search["embedding_kl"] = {str(k): v for k, v in kls.items()}  # JSON keys: widths and tiers alike
    plan.plan.search["deletion_order"] = {"blocks": order, "kl": deletion_kls}
    plan.plan.search["predicted_kl_by_group_size"] = by_group
    plan.plan.search["rounding_weight"] = config.rounding_weight
    return replace(plan, row_usage=usage)


def embedding_precisions(model: nn.Module, tokenizer, config) -> tuple[tuple[int | str, ...], torch.Tensor | None]:
    """The embedding's packed precisions the joint search prices: ``config.joint_bits`` and, for a table tied to
    the LM head, ``config.embedding_tiers`` whose widths are all allowed; with the rows' usage that tiers rank by
    (None without tiers). An untied model prices no tiers (its head is a matrix of its own)."""
    from .quant.tiers import RowTiers, corpus_usage

    tiers = tuple(str(RowTiers.parse(t)) for t in config.embedding_tiers)
    if not tiers or len(embedding_tensors(model)) > 1:
        return tuple(config.joint_bits), None
    return (*config.joint_bits, *tiers), corpus_usage(model, tokenizer)


class SkippedBlock(nn.Module):
    """A deleted block while a plan is measured: hands its input hidden states on unchanged."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        from .replay import copy_block_attributes

        copy_block_attributes(block, self)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _measured_storage(model: nn.Module, bits: int | str | None, group_size: int, removed: list[int],
                      rounding: EmbeddingRounding):  # fmt: skip
    """Prepare a measured plan's model: the embedding (and an untied head) rounded to ``bits`` as the packing will
    round it (``rounding``) and the ``removed`` blocks skipped, after the original's distributions are recorded.
    Returns the undo."""

    def prepare(replay) -> Callable[[], None]:
        tensors = embedding_tensors(model) if bits is not None else []
        saved = [p.detach().clone() for p in tensors]
        with torch.no_grad():
            for p in tensors:
                p.copy_(rounding.table(p, bits, group_size))
        blocks = {i: replay.blocks[i] for i in removed}
        for i, block in blocks.items():
            replay.blocks[i] = SkippedBlock(block)

        def undo() -> None:
            with torch.no_grad():
                for p, value in zip(tensors, saved):
                    p.copy_(value)
            for i, block in blocks.items():
                replay.blocks[i] = block

        return undo

    return prepare


def best_measured_start(
    model: nn.Module,
    tokenizer,
    plans: list[JointPlan],
    candidates: dict[str, MatrixCandidates],
    priced: dict[int, tuple[dict[str, list[Option]], dict]],
    tokens: int = 1024,
    context: int = 512,
    rounding: EmbeddingRounding = EmbeddingRounding(),
    objective: str = "kl",
) -> tuple[JointPlan, list[dict]]:
    """Of the knapsack's plan and its single-technique rivals (:func:`uniform_plans`), the one with the least
    ``objective`` (KL to the original, or NLL of the text) measured as :func:`refine_joint` measures (so the search
    never starts below, nor returns, a plan measured worse than uniform packing); with each one's figures (both
    measures). One plan alone is returned unmeasured."""
    check_objective(objective)
    if len(plans) == 1:
        return plans[0], []
    starts, scores = [], []
    for plan in plans:
        search, level, budget = _joint_search(model, tokenizer, plan, candidates, priced[plan.group_size][0],
                                              tokens, context, rounding)  # fmt: skip
        score = search.run(level, budget, 0)[2]
        scores.append(score)
        starts.append({"method": plan.plan.method, "group_size": plan.group_size, "embedding_bits": plan.embedding_bits,
                       "predicted_kl": plan.predicted_kl, "predicted_bytes": plan.predicted_bytes,
                       "measured_kl": score.kl, "measured_nll": score.loss})  # fmt: skip
    best = min(range(len(plans)), key=lambda i: scores[i].value(objective))
    return plans[best], starts


def _joint_search(model: nn.Module, tokenizer, joint: JointPlan, candidates: dict[str, MatrixCandidates],
                  options: dict[str, list[Option]], tokens: int, context: int,
                  rounding: EmbeddingRounding, objective: str = "kl"):  # fmt: skip
    """The evolutionary search over ``joint``'s matrices (sizes in bytes, measured as packed on unseen calibration
    text), with the plan's levels on each matrix's ladder and the bytes the matrices may take."""
    from .calibration import unseen_calibration_windows
    from .search import Evolution

    names = list(joint.plan.layers)
    ladders = {n: options[n] for n in names}
    level = {}
    for n in names:
        c = joint.plan.layers[n]
        level[n] = next(i for i, o in enumerate(ladders[n]) if (o.layout, o.chi, o.bits) == (c.layout, c.chi, c.bits))
    spent = sum(ladders[n][level[n]].nbytes for n in names)
    budget = spent + joint.budget_bytes - joint.predicted_bytes  # the matrices may use the plan's slack too
    windows = unseen_calibration_windows(tokenizer, tokens, min(context, tokens))
    prepare = _measured_storage(model, joint.embedding_bits, joint.group_size, joint.removed_blocks, rounding)
    search = Evolution(model, windows, candidates, ladders, lambda o: o.nbytes, joint.group_size, prepare, objective)
    return search, level, budget


def refine_joint(
    model: nn.Module,
    tokenizer,
    joint: JointPlan,
    candidates: dict[str, MatrixCandidates],
    alphas: dict[str, float],
    options: dict[str, list[Option]],
    evaluations: int,
    tokens: int = 1024,
    context: int = 512,
    rounding: EmbeddingRounding = EmbeddingRounding(),
    seed: int = 0,
    on_eval: Callable[[int, int], None] | None = None,
    objective: str = "kl",
) -> JointPlan:
    """The knapsack's plan refined on real evaluations (:class:`bondcut.search.Evolution`, sizes in bytes): each
    matrix moves along its priced options (``options``, every precision) while the bytes of the matrices stay
    within what the plan may spend on them; the embedding's precision and the deleted blocks stay as planned and
    take part in every measurement; dense matrices and the embedding are measured as their packing stores them (the
    embedding as ``rounding`` rounds it), MPO cores rounded to nearest, on calibration text the statistics
    behind those choices have not seen (measured on the text they were fitted to, fitted options look better than
    they are on other text). The result's measured ``objective`` (KL to the original, or the text's NLL) is at
    most the starting plan's."""
    began = time.perf_counter()
    names = list(joint.plan.layers)
    search, level, budget = _joint_search(model, tokenizer, joint, candidates, options, tokens, context, rounding,
                                          objective)  # fmt: skip
    spent = sum(options[n][level[n]].nbytes for n in names)
    level, accepted, start, parent = search.run(level, budget, evaluations, seed=seed, on_eval=on_eval)
    chosen = {n: options[n][level[n]] for n in names}
    layers = {n: choice_of(candidates[n], o, alphas[n]) for n, o in chosen.items()}
    used = joint.predicted_bytes - spent + sum(o.nbytes for o in chosen.values())
    old = sum(c.predicted for c in joint.plan.layers.values())
    predicted = joint.predicted_kl - old + sum(c.predicted for c in layers.values())  # embedding, deletions stay
    stats = {**joint.plan.search, "evaluations": evaluations, "accepted": accepted, "tokens": tokens,
             "objective": objective, "kl_before": start.kl, "kl_after": parent.kl, "loss_before": start.loss,
             "loss_after": parent.loss, "seconds": time.perf_counter() - began}  # fmt: skip
    plan = Plan(layers=layers, budget=joint.budget_bytes, method=f"{joint.plan.method}+search", search=stats,
                predicted_loss=predicted)  # fmt: skip
    return replace(joint, plan=plan, predicted_bytes=used, predicted_kl=predicted)


def packing_of(plan: JointPlan, rounding: str, rotate: bool = False) -> dict:
    """What ``plan`` packs, as a JSON-ready dict: bits per matrix name, the embedding's bits, group size, rounding
    (and ``rotate`` when the dense matrices' inputs are rotated)."""
    layers = {n: c.bits for n, c in plan.plan.layers.items() if c.bits is not None}
    packing = {"layers": layers, "embedding_bits": plan.embedding_bits, "group_size": plan.group_size,
               "rounding": rounding}  # fmt: skip
    return {**packing, "rotate": True} if rotate else packing


def apply_storage(
    model: nn.Module,
    plan: JointPlan,
    rounding: str = "rtn",
    tokenizer=None,
    calibration_tokens: int = 16384,
    defer_packing: bool = False,
    rotate: bool = False,
) -> dict:
    """After the MPO surgery: delete the plan's blocks, then pack what it packs (matrices, embedding).

    ``rounding`` "gptq" rounds dense matrices and the embedding activation-aware on ``calibration_tokens``
    (cores always to nearest), with the blocks already gone. ``defer_packing`` stops after the deletion, so the
    float model can be healed first; the returned packing (names as they stand after deletion) is then applied
    by :func:`apply_packing`."""
    from .layerchop import names_after_removal, remove_blocks

    packing = packing_of(plan, rounding, rotate)
    if plan.removed_blocks:
        renamed = names_after_removal(model, list(packing["layers"]), plan.removed_blocks)
        packing["layers"] = {renamed[n]: b for n, b in packing["layers"].items() if renamed[n] is not None}
        remove_blocks(model, plan.removed_blocks)
    if not defer_packing:
        apply_packing(model, packing, tokenizer, calibration_tokens, plan.row_usage)
    return packing


def apply_packing(model: nn.Module, packing: dict, tokenizer=None, calibration_tokens: int = 16384,
                  row_usage: torch.Tensor | None = None) -> None:  # fmt: skip
    """Pack, in place, the matrices and embedding that ``packing`` (from :func:`packing_of`) names, to its bits.

    GPTQ rounding collects the statistics of every packed dense matrix and of the head in one calibration pass.
    Row tiers rank the rows by ``row_usage`` (the search's ranking, :attr:`JointPlan.row_usage`; None: ranked
    afresh on ``model``, as after healing)."""
    from .quant import QuantizeConfig, quantize_model
    from .quant.apply import gram_matrices
    from .quant.tiers import RowTiers

    packed, rounding, embedding = packing["layers"], packing["rounding"], packing["embedding_bits"]
    if (rounding == "gptq" or (isinstance(embedding, str) and row_usage is None)) and tokenizer is None:
        raise ValueError("GPTQ packing and row tiers need calibration text: pass the tokenizer")
    settings = dict(group_size=packing["group_size"], method=rounding, calibration_tokens=calibration_tokens,
                    rotate=packing.get("rotate", False))  # fmt: skip
    grams = None
    if rounding == "gptq":
        everything = QuantizeConfig(**settings, only=tuple(packed), embeddings=embedding is not None)
        grams = gram_matrices(model, tokenizer, everything)
    for bits in sorted(set(packed.values())):
        only = tuple(n for n, b in packed.items() if b == bits)
        quantize_model(model, QuantizeConfig(**settings, bits=bits, embeddings=False, only=only), grams=grams)
    if isinstance(embedding, str):  # row tiers, ranked on the corpus as the search ranked them
        tiers = QuantizeConfig(**settings, bits=max(RowTiers.parse(embedding).widths), linear=False,
                               embedding_tiers=embedding)  # fmt: skip
        quantize_model(model, tiers, tokenizer=tokenizer, grams=grams, usage=row_usage)
    elif embedding is not None:
        quantize_model(model, QuantizeConfig(**settings, bits=embedding, linear=False), grams=grams)


def apply_pending_packing(model: nn.Module, tokenizer=None, calibration_tokens: int = 16384) -> dict:
    """Pack what ``compress(..., CompressConfig(target_bytes=..., defer_packing=True))`` left pending (after
    healing, typically), in place, and clear it from the config. Returns the packing applied."""
    from .hf_integration import attach_layout_config, pending_packing

    packing = pending_packing(model)
    if packing is None:
        raise ValueError("this model has no pending packing: it comes from compress --target-bytes "
                         "--defer-packing (Python: CompressConfig(target_bytes=..., defer_packing=True))")  # fmt: skip
    apply_packing(model, packing, tokenizer, calibration_tokens)
    attach_layout_config(model, pending_packing=None)
    return packing


def pack_pending_except_cores(model: nn.Module, tokenizer=None, calibration_tokens: int = 16384) -> tuple[dict, int]:
    """Quantization-aware healing of a deferred joint model, first half: pack the dense matrices and embedding
    its pending plan packs (as :func:`apply_packing` would), leave the MPO layers float, and return the widths the
    plan gives them ({layer name: bits}) with the plan's group size, to train the cores through that rounding
    (:func:`bondcut.quant.aware.make_quant_aware`). The plan stays in the config until the cores are packed too."""
    from .hf_integration import pending_packing
    from .mpo_linear import MPOLinear

    packing = pending_packing(model)
    if packing is None:
        raise ValueError("quant_pending needs a model with a pending packing: compress it with --target-bytes "
                         "--defer-packing (Python: CompressConfig(target_bytes=..., defer_packing=True))")  # fmt: skip
    mpo = {name for name, module in model.named_modules() if isinstance(module, MPOLinear)}
    cores = {name: bits for name, bits in packing["layers"].items() if name in mpo}
    rest = {name: bits for name, bits in packing["layers"].items() if name not in mpo}
    apply_packing(model, {**packing, "layers": rest}, tokenizer, calibration_tokens)
    return cores, packing["group_size"]
