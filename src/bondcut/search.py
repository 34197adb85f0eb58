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
from .config import check_objective
from .replay import BlockReplay, Score
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
    objective: str = "kl",
) -> Plan:
    """A plan at most ``plan.budget`` params whose measured ``objective`` (KL to the original, or NLL of the
    text) is <= the starting plan's."""
    began = time.perf_counter()
    names = list(plan.layers)
    ladders = {n: efficient_options(candidates[n]) for n in names}
    level = {n: _level_of(ladders[n], plan.layers[n]) for n in names}
    windows = calibration_windows(tokenizer, tokens, min(context, tokens))
    search = Evolution(model, windows, candidates, ladders, lambda o: o.params, objective=objective)
    level, accepted, start, parent = search.run(level, plan.budget, evaluations, offspring, seed, on_eval)
    layers = {n: choice_of(candidates[n], ladders[n][level[n]], alphas[n]) for n in names}
    stats = {**plan.search, "evaluations": evaluations, "accepted": accepted, "tokens": tokens, "objective": objective,
             "kl_before": start.kl, "kl_after": parent.kl,
             "loss_before": start.loss, "loss_after": parent.loss, "seconds": time.perf_counter() - began}  # fmt: skip
    return Plan(layers=layers, budget=plan.budget, method=f"{plan.method}+search", search=stats,
                predicted_loss=sum(c.predicted for c in layers.values()))  # fmt: skip


class Evolution:
    """The (1 + lambda) search over each matrix's ladder of options, measured on ``windows`` with block replay.

    ``size`` prices an option against the budget (parameters, or bytes for the joint plan); ``group_size`` is
    the packing's, for options with bits. ``prepare(replay)`` may change the model around the matrices (the
    joint plan's deleted blocks and rounded embedding) after the original's distributions are recorded.
    ``objective`` is what a mutant must lower to replace its parent: ``"kl"`` (to the original) or ``"nll"``.
    """

    def __init__(
        self,
        model: nn.Module,
        windows,
        candidates: dict[str, MatrixCandidates],
        ladders: dict[str, list[Option]],
        size: Callable[[Option], int],
        group_size: int = 64,
        prepare: Callable[[BlockReplay], Callable[[], None]] | None = None,
        objective: str = "kl",
    ) -> None:
        self.model, self.windows, self.candidates, self.ladders = model, windows, candidates, ladders
        self.size, self.group_size, self.prepare = size, group_size, prepare
        self.objective = check_objective(objective)  # an unknown one fails here, before any measurement

    def run(self, level: dict[str, int], budget: int, evaluations: int, offspring: int = 4, seed: int = 0,
            on_eval: Callable[[int, int], None] | None = None) -> tuple[dict[str, int], int, Score, Score]:  # fmt: skip
        """Levels at most ``budget`` in size whose measured objective is <= the starting ones'; with the number of
        accepted generations and the scores at the start and the end. The model is left as it was."""
        rng = random.Random(seed)
        names = list(level)
        originals = {n: self.model.get_submodule(n) for n in names}
        stand_ins = {n: linear_with_weight(self._weight(n, self.ladders[n][level[n]]), getattr(originals[n], "bias", None))
                     for n in names}  # fmt: skip
        runner = BlockReplay(self.model, self.windows, names)
        undo = None
        try:
            runner.record(as_reference=True)  # the original's distributions
            undo = self.prepare(runner) if self.prepare is not None else None
            for name, layer in stand_ins.items():
                set_submodule(self.model, name, layer)
            parent = start = runner.record()
            done = accepted = 0
            while done < evaluations:
                best = None
                for _ in range(min(offspring, evaluations - done)):
                    child = _mutate(level, self.ladders, budget, rng, self.size)
                    done += 1
                    if child is None:
                        continue
                    changed = [n for n in names if child[n] != level[n]]
                    self._apply(stand_ins, child, changed)
                    value = runner.score(min(runner.block_of(n) for n in changed)).value(self.objective)
                    self._apply(stand_ins, level, changed)
                    if best is None or value < best[0]:
                        best = (value, child, changed)
                    if on_eval is not None:
                        on_eval(done, evaluations)
                if best is not None and best[0] < parent.value(self.objective):
                    self._apply(stand_ins, best[1], best[2])
                    level, accepted = best[1], accepted + 1
                    parent = runner.record()
        finally:
            for name, module in originals.items():
                set_submodule(self.model, name, module)
            if undo is not None:
                undo()
        return level, accepted, start, parent

    def _weight(self, name: str, option: Option):
        return stand_in_weight(self.candidates[name], option, self.group_size)

    def _apply(self, stand_ins: dict[str, nn.Linear], levels: dict[str, int], names: list[str]) -> None:
        """Load the weights of ``levels`` into the stand-ins of ``names``."""
        for name in names:
            stand_ins[name].weight.data.copy_(self._weight(name, self.ladders[name][levels[name]]))


def _level_of(ladder: list[Option], choice) -> int:
    """Index on the ladder of the plan's option (the nearest efficient one at or below its size)."""
    fitting = [i for i, o in enumerate(ladder) if o.params <= choice.params]
    exact = [i for i in fitting if ladder[i].layout == choice.layout and ladder[i].chi == choice.chi]
    return exact[0] if exact else max(fitting, default=0)


def _mutate(
    level: dict[str, int],
    ladders: dict[str, list[Option]],
    budget: int,
    rng: random.Random,
    size: Callable[[Option], int] = lambda o: o.params,
) -> dict | None:
    """One matrix up a level, random others down until the total ``size`` fits; None if no such move was found."""
    child = dict(level)
    growable = [n for n in child if child[n] + 1 < len(ladders[n])]
    if not growable:
        return None
    up = rng.choice(growable)
    child[up] += 1
    total = sum(size(ladders[n][child[n]]) for n in child)
    shrinkable = [n for n in child if n != up and child[n] > 0]
    while total > budget and shrinkable:
        down = rng.choice(shrinkable)
        total -= size(ladders[down][child[down]]) - size(ladders[down][child[down] - 1])
        child[down] -= 1
        if child[down] == 0:
            shrinkable.remove(down)
    return child if total <= budget else None
