"""Price MLP neuron selection inside the allocation, so the plan splits the budget for the structure it builds.

Converting a plan made for low-rank MLPs at equal parameters (:func:`bondcut.neurons.narrow_mlp`) keeps the
low-rank plan's split between attention and MLPs, yet whole neurons cost an MLP far less error per parameter
than low-rank factors. Here every gated MLP is one item of the knapsack and of the search instead of three: its
options are "keep the k best neurons" for k on a ladder (:data:`NEURON_STEP`), priced at the parameters of all
three matrices and at the relative output error of the ridge refit, and its predicted damage is the down
projection's fitted sensitivity times that error (the profile fits the same quantity: the relative error of the
MLP's output). The errors of every k come from one Cholesky factorization: with the neurons in score order and
G = C + lam I, L = chol(G) and Z = L^-1 (W_d C)^T, the ridge objective of the first k neurons is

    ||W_d h - W'_k h_k||^2 + lam ||W'_k||^2 = tr(W_d C W_d^T) - ||Z[:k]||^2,

because leading blocks of L are the Cholesky factors of leading blocks of G (an upper bound on the output
error, by the small ridge term). The search measures a neuron option through the down projection alone: its
refit columns in place and zeros for the dropped neurons give the MLP's exact output. Only the k-prefix energies
outlive the factorization: a stand-in re-solves its own k x k ridge system (:func:`bondcut.neurons.ridge_refit`),
so an MLP item holds no h x h matrix of its own (the factor of a 7B model's MLP alone is ~1 GB in fp64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .allocate import LayerChoice, Plan
from .candidates import MatrixCandidates, Option
from .neurons import RIDGE, GatedMLP, neuron_order, ridge_lambda, ridge_refit

NEURON_STEP = 32  # neurons per level of an MLP's ladder: ~55k parameters on SmolLM2-135M's MLPs
NEURONS = "neurons"  # the layout name of a neuron option (its chi is the number of kept neurons)


class NeuronSpectrum:
    """A gated MLP's neuron selections at every count: ridge objective per count and the down projection's stand-in.

    ``down`` is (d_out, h), ``hidden_cov`` the (h, h) sum of its input outer products; ``per_neuron`` the
    parameters one neuron costs across the three matrices.
    """

    exact = True
    layout: tuple = ()  # not an MPO; the plan's sites are set by :func:`expand_plan`

    def __init__(self, down: torch.Tensor, hidden_cov: torch.Tensor, per_neuron: int, ridge: float = RIDGE) -> None:
        self.down, self.hidden_cov, self.ridge = down.detach(), hidden_cov, ridge  # references, not copies
        self.dtype, self.shape, self.per_neuron = down.dtype, tuple(down.shape), per_neuron
        self.order = neuron_order(down, hidden_cov)  # (h,)
        cov, down64 = hidden_cov.double(), self.down.double()
        gram = cov[self.order][:, self.order]
        gram.diagonal().add_(ridge_lambda(cov, ridge))
        factor = torch.linalg.cholesky(gram)  # L, lower: leading blocks factor leading blocks of G
        target = (down64 @ cov[:, self.order]).T  # (h, d_out): (W_d C)^T in score order
        whitened = torch.linalg.solve_triangular(factor, target, upper=False)  # Z = L^-1 (W_d C)^T
        self.norm_sq = float((down64 @ cov * down64).sum())  # tr(W_d C W_d^T)
        self.explained = torch.cumsum((whitened**2).sum(1), 0)  # ||Z[:k]||^2 for k = 1..h; L and Z are let go

    @property
    def max_chi(self) -> int:
        return self.shape[1]

    def params(self, keep: int) -> int:
        return keep * self.per_neuron

    def error(self, keep: int) -> float:
        """Relative ridge objective of the best ``keep`` neurons (>= their relative output error); 0 with all."""
        if keep >= self.max_chi or self.norm_sq <= 0:
            return 0.0
        return max(0.0, 1.0 - float(self.explained[keep - 1]) / self.norm_sq)

    def dense(self, keep: int) -> torch.Tensor:
        """The (d_out, h) down projection of the selection: refit columns at the kept neurons, zeros elsewhere."""
        keep = max(1, min(keep, self.max_chi))
        kept = self.order[:keep]
        stand_in = torch.zeros(self.shape, dtype=torch.float64)
        stand_in[:, kept] = ridge_refit(self.down, self.hidden_cov, kept, self.ridge)
        return stand_in.to(self.dtype)


def priced_mlps(
    mlps: Sequence[GatedMLP], names: Sequence[str], hidden_covs: Mapping[str, torch.Tensor]
) -> list[GatedMLP]:
    """The gated MLPs the allocation prices as neuron selections: all three matrices among the targets ``names``
    and the hidden statistics at hand. Their gate and up projections need no candidates and no profile."""
    present = set(names)
    return [m for m in mlps if all(n in present for n in m.names) and m.down in hidden_covs]


def mlp_items(
    candidates: Mapping[str, MatrixCandidates],
    mlps: Sequence[GatedMLP],
    weights: Mapping[str, torch.Tensor],
    hidden_covs: Mapping[str, torch.Tensor],
    step: int = NEURON_STEP,
) -> dict[str, MatrixCandidates]:
    """The allocation's items with every gated MLP of :func:`priced_mlps` as one: it keeps its down projection's
    name and place and carries neuron options priced for the whole MLP (the down projection must be a candidate:
    its profile prices the MLP); gate and up leave if they are candidates. Other matrices keep their candidates.
    Biases are not priced (the same for every option)."""
    grouped = {m.down: m for m in priced_mlps(mlps, list(weights), hidden_covs) if m.down in candidates}
    members = {n for m in grouped.values() for n in m.names}
    items: dict[str, MatrixCandidates] = {}
    for name, entry in candidates.items():
        if name in grouped:
            items[name] = _mlp_item(grouped[name], weights, hidden_covs[name], step)
        elif name not in members:
            items[name] = entry
    return items


def _mlp_item(mlp: GatedMLP, weights: Mapping[str, torch.Tensor], hidden_cov: torch.Tensor, step: int):
    gate, up, down = (weights[n] for n in mlp.names)
    per_neuron = gate.shape[1] + up.shape[1] + down.shape[0]
    spectrum = NeuronSpectrum(down, hidden_cov, per_neuron)
    hidden = down.shape[1]
    entry = MatrixCandidates(mlp.down, tuple(down.shape), spectra={NEURONS: spectrum}, weight=down.detach())
    entry.options.append(Option("dense", None, hidden * per_neuron, 0.0))
    entry.options.extend(Option(NEURONS, k, spectrum.params(k), spectrum.error(k)) for k in range(step, hidden, step))
    return entry


def kept_neurons(plan: Plan, mlps: Sequence[GatedMLP]) -> dict[str, int]:
    """Hidden neurons the plan keeps per MLP, by down projection name (MLPs it keeps whole are left out)."""
    return {
        m.down: plan.layers[m.down].chi for m in mlps if m.down in plan.layers and plan.layers[m.down].layout == NEURONS
    }


def expand_plan(plan: Plan, mlps: Sequence[GatedMLP], shapes: Mapping[str, tuple[int, int]]) -> Plan:
    """The plan with every MLP item written back as its three matrices (``shapes``: (out, in) by name), each with
    its own parameters and sites; the MLP's error on all three, its predicted damage on the down projection."""
    layers: dict[str, LayerChoice] = {}
    by_down = {m.down: m for m in mlps}
    for name, choice in plan.layers.items():
        mlp = by_down.get(name)
        if mlp is None or any(n in plan.layers for n in (mlp.gate, mlp.up)):
            layers[name] = choice
            continue
        for member in mlp.names:
            out, inp = shapes[member]
            dense = out * inp
            if choice.layout == NEURONS:
                keep = choice.chi
                site = [out, keep] if member == mlp.down else [keep, inp]
                sites, params = [site], keep * (inp if member != mlp.down else out)
            else:
                sites, params = None, dense
            predicted = choice.predicted if member == mlp.down else 0.0
            layers[member] = LayerChoice(choice.layout, sites, choice.chi, params, dense, choice.error, predicted)
    return Plan(layers=layers, budget=plan.budget, method=plan.method, predicted_loss=plan.predicted_loss,
                search=plan.search, version=plan.version)  # fmt: skip
