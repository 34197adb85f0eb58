"""Allocation: choose every matrix's layout and bond dimension under one parameter budget.

The damage of compressing matrix l to option o is predicted as alpha_l * e_l(o): e_l is the option's relative
output error (exact from one SVD per layout, :mod:`bondcut.candidates`) and alpha_l the matrix's sensitivity,
fitted to the KL divergence from the original that the profile measured (:mod:`bondcut.profile`). A multiple-choice
knapsack (:mod:`bondcut.knapsack`) then picks the option of every matrix, dense included, that minimizes the
summed prediction within the budget; :mod:`bondcut.search` can refine that plan on real evaluations.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .candidates import MatrixCandidates, Option
from .knapsack import solve_knapsack

log = logging.getLogger(__name__)

PLAN_VERSION = 1
SENSITIVITY_FLOOR = 0.02  # alpha never below this fraction of the median (profile noise can read as zero or < 0)


@dataclass
class LayerChoice:
    """What the plan gives one matrix: ``layout`` "dense" or a candidate layout at bond ``chi``."""

    layout: str
    sites: list[list[int]] | None
    chi: int | None
    params: int
    dense_params: int
    error: float  # relative squared output error of the option
    predicted: float  # predicted KL divergence from the original, nats per token
    bits: int | None = None  # packed storage of the weight or cores (joint allocation); None = float


@dataclass
class Plan:
    """Per-matrix choices under a parameter budget, with how they were found."""

    layers: dict[str, LayerChoice]
    budget: int
    method: str
    predicted_loss: float
    search: dict = field(default_factory=dict)  # refinement statistics, when a search ran
    version: int = PLAN_VERSION

    @property
    def params(self) -> int:
        return sum(c.params for c in self.layers.values())

    @property
    def dense_params(self) -> int:
        return sum(c.dense_params for c in self.layers.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        layers = {name: LayerChoice(**choice) for name, choice in data.pop("layers").items()}
        return cls(layers=layers, **data)

    def summary(self) -> dict[str, dict[str, float]]:
        """Kept fraction of parameters per module type and layout counts, for printing."""
        by_type: dict[str, list[int]] = {}
        layouts: dict[str, int] = {}
        for name, choice in self.layers.items():
            kind = name.rsplit(".", 1)[-1]
            kept, dense = by_type.setdefault(kind, [0, 0])
            by_type[kind] = [kept + choice.params, dense + choice.dense_params]
            layouts[choice.layout] = layouts.get(choice.layout, 0) + 1
        return {"kept_by_type": {k: a / b for k, (a, b) in by_type.items()}, "layouts": layouts}


def fit_sensitivities(damage: dict[str, list[float]], errors: dict[str, list[float]]) -> dict[str, float]:
    """alpha_l = argmin sum_f (damage_f - alpha e_f)^2 per matrix (least squares through the origin), floored.

    ``damage`` is the profile's measured KL divergence to the original (or loss increase) per kept fraction.

    The floor, :data:`SENSITIVITY_FLOOR` x the median alpha, keeps a matrix whose measured increase is within
    noise (or negative) from being treated as free to remove.
    """
    alphas = {}
    for name, losses in damage.items():
        errs = errors[name]
        denominator = sum(e * e for e in errs)
        alphas[name] = sum(d * e for d, e in zip(losses, errs)) / denominator if denominator > 0 else 0.0
    positive = [a for a in alphas.values() if a > 0]
    floor = SENSITIVITY_FLOOR * (statistics.median(positive) if positive else 1.0)
    return {name: max(alpha, floor) for name, alpha in alphas.items()}


def solve_plan(candidates: dict[str, MatrixCandidates], alphas: dict[str, float], budget: int) -> Plan:
    """The knapsack-optimal option per matrix for the predicted loss sum(alpha_l * e_l) within ``budget`` params."""
    names = list(candidates)
    sizes = [[o.params for o in candidates[n].options] for n in names]
    costs = [[alphas[n] * o.error for o in candidates[n].options] for n in names]
    picks = solve_knapsack(sizes, costs, budget)
    layers = {n: choice_of(candidates[n], candidates[n].options[i], alphas[n]) for n, i in zip(names, picks)}
    return Plan(layers=layers, budget=budget, method="profile-knapsack",
                predicted_loss=sum(c.predicted for c in layers.values()))  # fmt: skip


def choice_of(entry: MatrixCandidates, option: Option, alpha: float) -> LayerChoice:
    """The plan entry for ``option`` of ``entry``."""
    sites = None if option.layout == "dense" else [list(s) for s in entry.spectra[option.layout].layout]
    return LayerChoice(option.layout, sites, option.chi, option.params, entry.dense_params, option.error,
                       alpha * option.error, option.bits)  # fmt: skip


def model_fingerprint(model: nn.Module, names: list[str]) -> str:
    """A short hash of the targets' shapes and leading weights: names a cached profile of exactly this model."""
    from .surgery import dense_weight

    digest = hashlib.sha1(str(getattr(model.config, "model_type", "")).encode())
    for name in names:
        weight = dense_weight(model.get_submodule(name)).detach()
        digest.update(f"{name}{tuple(weight.shape)}".encode())
        digest.update(weight.reshape(-1)[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def sensitivities(
    model: nn.Module,
    tokenizer,
    candidates: dict[str, MatrixCandidates],
    config,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, float], dict]:
    """alpha per matrix, fitted to the (cached) profile's KL; and where the profile came from."""
    from .cache import cache_dir
    from .profile import profile
    from .surgery import select_targets

    names = list(candidates)  # may be fewer than the targets (MLPs priced as neurons profile their down only)
    every = [t.name for t in select_targets(model, config)]  # one cache per model and targets, any subset read
    cache = config.profile or cache_dir() / "profiles" / f"{model_fingerprint(model, every)}.json"
    spectra = {n: c.spectra["lowrank"] for n, c in candidates.items() if "lowrank" in c.spectra}
    if len(spectra) != len(names):
        raise ValueError("profile allocation needs the low-rank layout among the candidates (it prices sensitivity)")
    result = profile(model, tokenizer, fractions=config.profile_fractions, sites="lowrank",
                     calibration_tokens=config.profile_tokens, include=names, cache=Path(cache),
                     covariance_tokens=config.calibration_tokens, damping=config.damping, spectra=spectra,
                     activation_aware=config.calibration_tokens > 0,
                     on_layer=None if on_progress is None else lambda name, i, n: on_progress("profile", i, n))  # fmt: skip
    missing = [n for n in names if n not in result.layers]
    if missing:
        raise ValueError(f"the profile {cache} lacks {missing[:3]}; delete it or profile with the same targets")
    alphas = fit_sensitivities({n: result.layers[n].kl for n in names},
                               {n: result.layers[n].error for n in names})  # fmt: skip
    return alphas, {"path": str(cache), "forward_passes": result.forward_passes, "seconds": result.seconds}


def allocate(
    model: nn.Module,
    tokenizer,
    candidates: dict[str, MatrixCandidates],
    budget: int,
    config,
    on_progress: Callable[[str, int, int], None] | None = None,
    items: dict[str, MatrixCandidates] | None = None,
) -> Plan:
    """Profile the targets (cached per model and settings), fit sensitivities, solve, and optionally search.

    ``config`` is the :class:`bondcut.CompressConfig` (profile and search settings). ``on_progress(stage,
    done, total)`` reports the profile's and the search's progress. ``items`` are what the knapsack and the
    search choose among, when not every matrix is one (:func:`bondcut.neuron_pricing.mlp_items`: a gated MLP as
    one item under its down projection's name, priced with that matrix's sensitivity); by default the candidates.
    """
    alphas, source = sensitivities(model, tokenizer, candidates, config, on_progress)
    items = candidates if items is None else items
    plan = solve_plan(items, alphas, budget)
    plan.search["profile"] = source
    if config.search_evaluations:
        from .search import refine

        plan = refine(model, tokenizer, plan, items, alphas, evaluations=config.search_evaluations,
                      tokens=config.search_tokens, objective=config.search_objective,
                      on_eval=None if on_progress is None else lambda i, n: on_progress("search", i, n))  # fmt: skip
    log.info("plan: %s params of %s (budget %s), predicted loss +%.4f", plan.params, plan.dense_params, budget,
             plan.predicted_loss)  # fmt: skip
    return plan


def stand_in_weight(entry: MatrixCandidates, choice: LayerChoice | Option, group_size: int = 64) -> torch.Tensor:
    """The dense (out x in) matrix a plan choice or option represents (the original weight for "dense"),
    including the rounding of its packed storage when the choice has ``bits``: a dense matrix as its packing
    stored it (``entry.dense_packed_weights``: GPTQ, rotated, as the plan packs it) where the candidates kept that,
    else rounded to nearest; MPO cores to nearest, as they are packed."""
    from .quant.packing import dequantize, quantize

    bits = getattr(choice, "bits", None)
    if choice.layout == "dense":
        if bits is None:
            return entry.weight
        stored = entry.dense_packed_weights.get((bits, group_size))
        return (
            stored
            if stored is not None
            else dequantize(quantize(entry.weight, bits, group_size)).to(entry.weight.dtype)
        )
    if bits is None:
        return entry.spectra[choice.layout].dense(choice.chi).to(entry.weight.dtype)
    from .mpo import cores_to_dense

    cores = [dequantize(quantize(c, bits, group_size)) for c in entry.spectra[choice.layout].mpo(choice.chi).cores]
    return cores_to_dense(cores).to(entry.weight.dtype)
