"""Refine an allocation plan on real evaluations: a budgeted (1 + lambda) evolutionary search, EvoPress-style.

The profile-based plan adds up single-matrix predictions, but compression errors compound. Starting from it,
each generation makes ``offspring`` mutants: one random matrix moves up to its next larger efficient option and
random others move down until the budget holds again (Sieberling et al. 2024, "EvoPress", level-switch
mutation). Each mutant's KL divergence from the original on calibration text is measured with only the blocks
from its first change onward rerun (:class:`bondcut.replay.BlockReplay`); the best replaces the parent when it
is better. The number of mutant
evaluations is the budget the caller states.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from torch import nn

from .allocate import Plan, choice_of, stand_in_weight
from .calibration import calibration_windows
from .candidates import MatrixCandidates, Option
from .replay import BlockReplay
from .surgery import linear_with_weight, set_submodule


def efficient_options(entry: MatrixCandidates) -> list[Option]:
    """The options no other option beats on both size and error, by size (the matrix's ladder of levels)."""
    ladder: list[Option] = []
    for option in sorted(entry.options, key=lambda o: (o.params, o.error)):
        if not ladder or option.error < ladder[-1].error:
            ladder.append(option)
    return ladder


def refine(
    model: nn.Module,
    tokenizer,
    plan: Plan,
    candidates: dict[str, MatrixCandidates],
    alphas: dict[str, float],
    evaluations: int,
    tokens: int = 1024,
    context: int = 512,
    offspring: int = 4,
    seed: int = 0,
    on_eval: Callable[[int, int], None] | None = None,
) -> Plan:
    """A plan at most ``plan.budget`` params whose measured KL to the original is <= the starting plan's."""
    began = time.perf_counter()
    rng = random.Random(seed)
    names = list(plan.layers)
    ladders = {n: efficient_options(candidates[n]) for n in names}
    level = {n: _level_of(ladders[n], plan.layers[n]) for n in names}
    originals = {n: model.get_submodule(n) for n in names}
    stand_ins = {n: linear_with_weight(stand_in_weight(candidates[n], plan.layers[n]), getattr(originals[n], "bias", None))
                 for n in names}  # fmt: skip
    runner = BlockReplay(model, calibration_windows(tokenizer, tokens, min(context, tokens)), names)
    try:
        runner.record(as_reference=True)  # the original's distributions
        for name, layer in stand_ins.items():
            set_submodule(model, name, layer)
        parent = start = runner.record()
        done = accepted = 0
        while done < evaluations:
            best = None
            for _ in range(min(offspring, evaluations - done)):
                child = _mutate(level, ladders, plan.budget, rng)
                done += 1
                if child is None:
                    continue
                changed = [n for n in names if child[n] != level[n]]
                _apply(stand_ins, candidates, ladders, child, changed)
                kl = runner.score(min(runner.block_of(n) for n in changed)).kl
                _apply(stand_ins, candidates, ladders, level, changed)
                if best is None or kl < best[0]:
                    best = (kl, child, changed)
                if on_eval is not None:
                    on_eval(done, evaluations)
            if best is not None and best[0] < parent.kl:
                _apply(stand_ins, candidates, ladders, best[1], best[2])
                level, accepted = best[1], accepted + 1
                parent = runner.record()
    finally:
        for name, module in originals.items():
            set_submodule(model, name, module)
    layers = {n: choice_of(candidates[n], ladders[n][level[n]], alphas[n]) for n in names}
    stats = {**plan.search, "evaluations": evaluations, "accepted": accepted, "tokens": tokens,
             "kl_before": start.kl, "kl_after": parent.kl,
             "loss_before": start.loss, "loss_after": parent.loss, "seconds": time.perf_counter() - began}  # fmt: skip
    return Plan(layers=layers, budget=plan.budget, method=f"{plan.method}+search", search=stats,
                predicted_loss=sum(c.predicted for c in layers.values()))  # fmt: skip


def _level_of(ladder: list[Option], choice) -> int:
    """Index on the ladder of the plan's option (the nearest efficient one at or below its size)."""
    fitting = [i for i, o in enumerate(ladder) if o.params <= choice.params]
    exact = [i for i in fitting if ladder[i].layout == choice.layout and ladder[i].chi == choice.chi]
    return exact[0] if exact else max(fitting, default=0)


def _mutate(level: dict[str, int], ladders: dict[str, list[Option]], budget: int, rng: random.Random) -> dict | None:
    """One matrix up a level, random others down until the total fits; None if no such move was found."""
    child = dict(level)
    growable = [n for n in child if child[n] + 1 < len(ladders[n])]
    if not growable:
        return None
    up = rng.choice(growable)
    child[up] += 1
    total = sum(ladders[n][child[n]].params for n in child)
    shrinkable = [n for n in child if n != up and child[n] > 0]
    while total > budget and shrinkable:
        down = rng.choice(shrinkable)
        total -= ladders[down][child[down]].params - ladders[down][child[down] - 1].params
        child[down] -= 1
        if child[down] == 0:
            shrinkable.remove(down)
    return child if total <= budget else None


def _apply(stand_ins: dict[str, nn.Linear], candidates, ladders, levels: dict[str, int], names: list[str]) -> None:
    """Load the weights of ``levels`` into the stand-ins of ``names``."""
    for name in names:
        stand_ins[name].weight.data.copy_(stand_in_weight(candidates[name], ladders[name][levels[name]]))
