"""Contracting an MPO with activations without building W, in the cheapest order.

Input x (B, n_1..n_k) meets cores G_i (r_{i-1}, m_i, n_i, r_i). We absorb one core at a time into x; the set
of absorbed cores is always one contiguous run [a..b], which grows by one core on its left or right. The state
then holds, per token and in this canonical order, n_j (j before the run), the bond r_a, m_a..m_b, the bond
r_{b+1}, n_j (j after the run). Absorbing a core contracts the state's matching index pair with it and adds the
core's P free entries, so a step costs 2 * (state entries per token) * P FLOPs, and the cheapest order is found
exactly by dynamic programming over the O(k^2) runs. This covers left-to-right and right-to-left sweeps and sweeps that start in
the middle. Plain low rank, sites (m x 1)(1 x n), comes out as x @ B^T then @ A^T: 2 r (m + n) FLOPs per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sites import Sites


@dataclass(frozen=True)
class ContractionStep:
    """Absorb ``core`` as one matmul: state viewed as (Z, Q, R) times the core viewed as A (P, Q) -> (Z, P, R).

    The state keeps the canonical order of the module docstring, where the two contracted indices (the
    core's input index and the bond it shares with the run) are always adjacent. So every step is a plain
    (batched) GEMM on a contiguous view, and its output is already the next step's canonical layout: no
    permutation of the large activation tensor is ever needed, only of the small core.
    """

    core: int
    core_perm: tuple[int, ...]  # permutation of the core (r, m, n, r') before reshaping it to (P, Q)
    p: int
    q: int
    r: int  # trailing size of the state that is carried through untouched


@dataclass(frozen=True)
class ContractionPlan:
    """The order in which cores meet the input, each step's matmul shape, and the cost per token."""

    order: tuple[int, ...]
    steps: tuple[ContractionStep, ...]
    flops_per_token: int


def plan_contraction(sites: Sites, bond_dims: tuple[int, ...]) -> ContractionPlan:
    """Cheapest absorption order (exact, by interval DP) for an MPO with these sites and bonds."""
    k = len(sites)
    ranks = (1, *bond_dims, 1)

    def state_size(a: int, b: int) -> int:
        """Entries per token of the state once the run [a..b] is absorbed (the raw input if a > b)."""
        n_outside = math.prod(nj for j, (_, nj) in enumerate(sites) if not a <= j <= b)
        if a > b:
            return n_outside
        return n_outside * ranks[a] * math.prod(mj for mj, _ in sites[a : b + 1]) * ranks[b + 1]

    def step(a: int, b: int, core: int) -> tuple[int, ContractionStep]:
        """Absorb ``core`` into the run [a..b] (empty if a > b): its cost per token and its matmul shape."""
        r_in, (m_i, n_i), r_out = ranks[core], sites[core], ranks[core + 1]
        trailing = math.prod(nj for _, nj in sites[core + 1 :])
        if a > b:  # first core: contract n_i only; P = (r_i, m_i, r_{i+1})
            plan = ContractionStep(core, (0, 1, 3, 2), r_in * m_i * r_out, n_i, trailing)
        elif core == a - 1:  # extend left: contract (n_i, r_{i+1}); P = (r_i, m_i)
            run = math.prod(mj for mj, _ in sites[a : b + 1]) * ranks[b + 1]
            after = math.prod(nj for _, nj in sites[b + 1 :])
            plan = ContractionStep(core, (0, 1, 2, 3), r_in * m_i, n_i * r_out, run * after)
        else:  # extend right: contract (r_i, n_i); P = (m_i, r_{i+1})
            plan = ContractionStep(core, (1, 3, 0, 2), m_i * r_out, r_in * n_i, trailing)
        return 2 * state_size(a, b) * plan.p, plan

    best: dict[tuple[int, int], tuple[int, tuple[ContractionStep, ...]]] = {}
    for i in range(k):
        cost, first = step(1, 0, i)
        best[(i, i)] = (cost, (first,))
    for length in range(2, k + 1):
        for a in range(k - length + 1):
            b = a + length - 1
            options = []
            left_cost, left_steps = best[(a + 1, b)]  # extend the run a+1..b by core a
            cost, s = step(a + 1, b, a)
            options.append((left_cost + cost, (*left_steps, s)))
            right_cost, right_steps = best[(a, b - 1)]  # extend the run a..b-1 by core b
            cost, s = step(a, b - 1, b)
            options.append((right_cost + cost, (*right_steps, s)))
            best[(a, b)] = min(options, key=lambda o: o[0])
    total, steps = best[(0, k - 1)]
    return ContractionPlan(order=tuple(st.core for st in steps), steps=steps, flops_per_token=total)


def step_matrices(cores: list[torch.Tensor], plan: ContractionPlan) -> list[torch.Tensor]:
    """Each step's core as its (P, Q) matrix, in plan order (a view where the permutation allows, else a copy)."""
    return [cores[st.core].permute(st.core_perm).reshape(st.p, st.q) for st in plan.steps]


def apply_steps(x: torch.Tensor, matrices: list[torch.Tensor], plan: ContractionPlan, n: int, m: int) -> torch.Tensor:
    """y = x @ W^T from the plan's step matrices (see :func:`step_matrices`). x: (..., n) -> (..., m)."""
    if x.shape[-1] != n:
        raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={n}")
    lead = x.shape[:-1]
    state = x.reshape(-1)  # canonical labels (B, n_1..n_k), flattened
    for st, a in zip(plan.steps, matrices):
        z = state.numel() // (st.q * st.r)
        if st.r == 1:
            state = torch.nn.functional.linear(state.reshape(z, st.q), a)  # (Z, P): one GEMM
        else:
            state = torch.matmul(a, state.reshape(z, st.q, st.r))  # (Z, P, R)
    # final canonical labels: (B, bond_0=1, m_1..m_k, bond_k=1)
    return state.reshape(*lead, m)


def contract(x: torch.Tensor, cores: list[torch.Tensor], sites: Sites, plan: ContractionPlan) -> torch.Tensor:
    """y = x @ W^T for the MPO W given by ``cores``, never forming W. x: (..., n) -> (..., m)."""
    n = math.prod(nj for _, nj in sites)
    m = math.prod(mj for mj, _ in sites)
    return apply_steps(x, step_matrices(cores, plan), plan, n, m)
