"""Multiple-choice knapsack: pick one option per item, minimizing the summed cost under a size budget.

The allocator's core: every matrix (item) has options (layout, bond dimension, or dense), each with a size in
parameters and a predicted loss. Exact dynamic programming over the budget in quanta (sizes are rounded *up* to
whole quanta, so the result always fits the true budget); numpy makes each item one vectorized pass per option.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def solve_knapsack(
    sizes: Sequence[Sequence[int]],
    costs: Sequence[Sequence[float]],
    budget: int,
    quanta: int = 20000,
) -> list[int]:
    """Index of the chosen option per item: min sum(cost) s.t. sum(size) <= budget.

    Args:
        sizes: per item, the size of each option (>= 0).
        costs: per item, the cost of each option, same shape as ``sizes``.
        budget: the total size allowed.
        quanta: budget resolution; sizes round up to ``budget / quanta``, so at most one quantum per item of
            the budget may go unused compared with the exact optimum.

    Raises ValueError when even the smallest option of every item does not fit.
    """
    if len(sizes) != len(costs) or any(len(s) != len(c) or not s for s, c in zip(sizes, costs)):
        raise ValueError("sizes and costs need the same shape, and every item at least one option")
    smallest = sum(min(s) for s in sizes)
    if smallest > budget:
        raise ValueError(f"budget {budget:,} is below the smallest possible total {smallest:,}; allow a larger size")
    quantum = max(budget / quanta, 1.0)
    capacity = int(budget // quantum)
    units = [np.ceil(np.asarray(s, dtype=np.float64) / quantum - 1e-9).astype(np.int64) for s in sizes]
    if sum(int(u.min()) for u in units) > capacity:  # rounding made the smallest total not fit: finer quanta
        return solve_knapsack(sizes, costs, budget, quanta * 4)
    best = np.zeros(capacity + 1)  # best[b]: least cost of the items so far within b quanta
    choices = []
    for item_units, item_costs in zip(units, costs):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int32)
        for option, (u, c) in enumerate(zip(item_units, item_costs)):
            if u > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[u:] = best[: capacity + 1 - u] + c
            better = candidate < new
            new[better], pick[better] = candidate[better], option
        best = new
        choices.append(pick)
    chosen, b = [], int(np.argmin(best))
    for item in range(len(sizes) - 1, -1, -1):
        option = int(choices[item][b])
        chosen.append(option)
        b -= int(units[item][option])
    return chosen[::-1]
