"""The allocator's multiple-choice knapsack against brute force, and bad budgets."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bondcut.knapsack import solve_knapsack

items = st.lists(
    st.lists(st.tuples(st.integers(0, 60), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=4),
    min_size=1,
    max_size=5,
)


@settings(max_examples=80, deadline=None)
@given(items, st.integers(0, 200))
def test_matches_brute_force_when_sizes_are_whole_quanta(options, budget):
    sizes = [[s for s, _ in item] for item in options]
    costs = [[c for _, c in item] for item in options]
    feasible = [
        combo
        for combo in itertools.product(*[range(len(item)) for item in options])
        if sum(sizes[i][j] for i, j in enumerate(combo)) <= budget
    ]
    if not feasible:
        with pytest.raises(ValueError, match="below the smallest possible total"):
            solve_knapsack(sizes, costs, budget)
        return
    best = min(sum(costs[i][j] for i, j in enumerate(combo)) for combo in feasible)
    chosen = solve_knapsack(sizes, costs, budget, quanta=max(budget, 1))  # one quantum = one unit: exact
    assert sum(sizes[i][j] for i, j in enumerate(chosen)) <= budget
    assert sum(costs[i][j] for i, j in enumerate(chosen)) == pytest.approx(best, abs=1e-9)


def test_coarse_quanta_still_fit_the_true_budget():
    sizes = [[1000, 5003, 9001], [1000, 5003, 9001], [1000, 5003, 9001]]
    costs = [[9.0, 1.0, 0.0], [8.0, 2.0, 0.0], [7.0, 3.0, 0.5]]
    coarse = solve_knapsack(sizes, costs, budget=15_010, quanta=10)  # 5,003 rounds up to 4 quanta of 1,501
    assert sum(sizes[i][j] for i, j in enumerate(coarse)) <= 15_010  # rounding up never breaks the budget
    fine = solve_knapsack(sizes, costs, budget=15_010)
    assert fine == [1, 1, 1]  # 15,009 fits; any 9,001 would need the others at 1,000 (cost >= 15.5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        solve_knapsack([[1, 2]], [[0.0]], 10)
