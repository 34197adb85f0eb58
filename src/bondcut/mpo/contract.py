"""Contracting an MPO with activations without building W, in the cheapest order.

Input x (B, n_1..n_k) meets cores G_i (r_{i-1}, m_i, n_i, r_i). We absorb one core at a time into x; the set
of absorbed cores is always one contiguous run [a..b], which grows by one core on its left or right. The state
then has labels B, n_j (j outside the run), r_a-bond, m_a..m_b, r_{b+1}-bond. A pairwise contraction costs
2 * (product of the sizes of all labels involved) FLOPs, so the cheapest order is found exactly by dynamic
programming over the O(k^2) runs. This covers left-to-right and right-to-left sweeps and sweeps that start in
the middle. Plain low rank, sites (m x 1)(1 x n), comes out as x @ B^T then @ A^T: 2 r (m + n) FLOPs per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sites import Sites

# integer labels for einsum's sublist form: batch, then n_j, m_j, bond_j (bond j sits left of core j)
_BATCH = 0


def _n(j: int) -> int:
    return 1 + j


def _m(j: int, k: int) -> int:
    return 1 + k + j


def _bond(j: int, k: int) -> int:
    return 1 + 2 * k + j


@dataclass(frozen=True)
class ContractionStep:
    """Absorb ``core`` as one matmul: state viewed as (Z, Q, R) times the core viewed as A (P, Q) -> (Z, P, R).

    Labels are kept in the canonical order of :func:`_state_labels`, where the two contracted labels (the
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


def _state_labels(k: int, a: int, b: int) -> tuple[int, ...]:
    """Labels of the state once cores a..b are absorbed; with a > b, the raw input."""
    if a > b:
        return (_BATCH, *(_n(j) for j in range(k)))
    return (
        _BATCH,
        *(_n(j) for j in range(a)),
        _bond(a, k),
        *(_m(j, k) for j in range(a, b + 1)),
        _bond(b + 1, k),
        *(_n(j) for j in range(b + 1, k)),
    )


def _core_labels(k: int, i: int) -> tuple[int, ...]:
    return (_bond(i, k), _m(i, k), _n(i), _bond(i + 1, k))


def plan_contraction(sites: Sites, bond_dims: tuple[int, ...]) -> ContractionPlan:
    """Cheapest absorption order (exact, by interval DP) for an MPO with these sites and bonds."""
    k = len(sites)
    ranks = (1, *bond_dims, 1)
    size = {_BATCH: 1}
    for j, (mj, nj) in enumerate(sites):
        size[_n(j)], size[_m(j, k)] = nj, mj
    for j, r in enumerate(ranks):
        size[_bond(j, k)] = r

    def step(a: int, b: int, core: int, na: int, nb: int) -> tuple[int, ContractionStep]:
        """Absorb ``core`` into the run [a..b] (empty if a > b), giving the run [na..nb]."""
        state, labels = _state_labels(k, a, b), _core_labels(k, core)
        cost = 2 * math.prod(size[x] for x in set(state) | set(labels))
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
        return cost, plan

    best: dict[tuple[int, int], tuple[int, tuple[ContractionStep, ...]]] = {}
    for i in range(k):
        cost, first = step(1, 0, i, i, i)
        best[(i, i)] = (cost, (first,))
    for length in range(2, k + 1):
        for a in range(k - length + 1):
            b = a + length - 1
            options = []
            left_cost, left_steps = best[(a + 1, b)]  # extend the run a+1..b by core a
            cost, s = step(a + 1, b, a, a, b)
            options.append((left_cost + cost, (*left_steps, s)))
            right_cost, right_steps = best[(a, b - 1)]  # extend the run a..b-1 by core b
            cost, s = step(a, b - 1, b, a, b)
            options.append((right_cost + cost, (*right_steps, s)))
            best[(a, b)] = min(options, key=lambda o: o[0])
    total, steps = best[(0, k - 1)]
    return ContractionPlan(order=tuple(st.core for st in steps), steps=steps, flops_per_token=total)


def contract(x: torch.Tensor, cores: list[torch.Tensor], sites: Sites, plan: ContractionPlan) -> torch.Tensor:
    """y = x @ W^T for the MPO W given by ``cores``, never forming W. x: (..., n) -> (..., m)."""
    lead = x.shape[:-1]
    n = math.prod(nj for _, nj in sites)
    m = math.prod(mj for mj, _ in sites)
    if x.shape[-1] != n:
        raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={n}")
    state = x.reshape(-1)  # canonical labels (B, n_1..n_k), flattened
    for st in plan.steps:
        a = cores[st.core].permute(st.core_perm).reshape(st.p, st.q)  # (P, Q), small
        z = state.numel() // (st.q * st.r)
        if st.r == 1:
            state = state.reshape(z, st.q) @ a.T  # (Z, P): one GEMM
        else:
            state = torch.matmul(a, state.reshape(z, st.q, st.r))  # (Z, P, R)
    # final canonical labels: (B, bond_0=1, m_1..m_k, bond_k=1)
    return state.reshape(*lead, m)
