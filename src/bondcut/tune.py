"""Pick, per MPO layer and by measured latency on this machine, how inference runs it.

An MPO with few parameters can still cost more FLOPs than the dense layer (a balanced 2-site MPO at half the
parameters does ~12x the dense FLOPs), and FLOPs are not time: small matmuls are overhead-bound. So for each
:class:`MPOLinear` we time the candidates on the shapes that matter (one token for decode, a long prompt for
prefill) and keep the fastest:

- the cores as they are, in the planned (fewest-FLOPs) order;
- merged cores: adjacent cores contracted into fewer, larger ones (exact), as long as they stay smaller than
  the dense weight;
- the dense weight materialized once (opt-in with ``allow_dense``: it gives back the memory saving).

Training is unaffected: with gradients on, the layer always contracts its cores.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .mpo import mpo_num_params, plan_contraction
from .mpo_linear import MPOLinear
from .timing import repeat_timings


@dataclass
class LayerChoice:
    """The merge chosen for one layer, and the median latency (ms) of every candidate per token count."""

    name: str
    chosen: tuple[int, ...]
    candidates: dict[str, dict[int, float]] = field(default_factory=dict)  # "2+1" -> {tokens: ms}
    params: dict[str, int] = field(default_factory=dict)  # "2+1" -> entries stored for inference
    flops_per_token: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def merge_label(merge: Sequence[int]) -> str:
    """(2, 1) -> '2+1'; all-singletons is the plain core contraction."""
    return "+".join(str(g) for g in merge)


def merge_candidates(layer: MPOLinear, allow_dense: bool) -> list[tuple[int, ...]]:
    """Every grouping of consecutive cores that stores fewer entries than the dense weight (or is dense, if allowed)."""
    k = len(layer.sites)
    dense = layer.out_features * layer.in_features
    options = []
    for cuts in itertools.product((False, True), repeat=k - 1):  # cut after core i or merge it with core i+1
        merge, size = [], 1
        for cut in cuts:
            if cut:
                merge.append(size)
                size = 1
            else:
                size += 1
        merge.append(size)
        merge = tuple(merge)
        if len(merge) == 1 and k > 1:
            if allow_dense:
                options.append(merge)
        elif len(merge) == k or mpo_num_params(*layer.merged_layout(merge)) < dense:
            options.append(merge)
    return sorted(options, key=len, reverse=True)  # the plain cores first


def _median_ms(layer: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    with torch.no_grad():
        return statistics.median(repeat_timings(lambda: layer(x), warmup, repeats)) * 1e3


def tune_layer(
    name: str,
    layer: MPOLinear,
    tokens: Sequence[int] = (1, 512),
    allow_dense: bool = False,
    warmup: int = 3,
    repeats: int = 15,
) -> LayerChoice:
    """Time every merge candidate of ``layer`` on inputs of (1, T, in_features) and keep the fastest one.

    The score of a candidate is the sum over T of its slowdown against the fastest candidate at that T, so
    decode (T=1) and prefill (large T) count equally.
    """
    first = layer.cores[0]
    inputs = {t: torch.randn(1, t, layer.in_features, dtype=first.dtype, device=first.device) for t in tokens}
    choice = LayerChoice(name=name, chosen=layer.merge)
    for merge in merge_candidates(layer, allow_dense):
        layer.set_merge(merge)
        label = merge_label(merge)
        choice.candidates[label] = {t: _median_ms(layer, x, warmup, repeats) for t, x in inputs.items()}
        sites, bonds = layer.merged_layout(merge)
        choice.params[label] = mpo_num_params(sites, bonds)
        choice.flops_per_token[label] = plan_contraction(sites, bonds).flops_per_token
    best = {t: min(times[t] for times in choice.candidates.values()) for t in tokens}
    scores = {label: sum(times[t] / best[t] for t in tokens) for label, times in choice.candidates.items()}
    chosen = min(scores, key=scores.get)
    choice.chosen = tuple(int(g) for g in chosen.split("+"))
    layer.set_merge(choice.chosen)
    return choice


def tune(
    model: nn.Module,
    tokens: Sequence[int] = (1, 512),
    allow_dense: bool = False,
    on_layer: Callable[[LayerChoice, int, int], None] | None = None,
    **timing,
) -> list[LayerChoice]:
    """Choose each MPOLinear's inference merge by measured latency (in place); returns the per-layer record.

    Layers with the same layout share one measurement: it would give the same answer up to noise.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MPOLinear)]
    decided: dict[tuple, LayerChoice] = {}
    choices = []
    for index, (name, layer) in enumerate(layers):
        key = (layer.sites, layer.bond_dims, layer.cores[0].dtype, layer.cores[0].device)
        if key in decided:
            template = decided[key]
            layer.set_merge(template.chosen)
            choice = LayerChoice(name, template.chosen, template.candidates, template.params, template.flops_per_token)
        else:
            choice = decided[key] = tune_layer(name, layer, tokens, allow_dense, **timing)
        choices.append(choice)
        if on_layer is not None:
            on_layer(choice, index + 1, len(layers))
    return choices


def inference_extra_bytes(model: nn.Module) -> int:
    """Bytes that merged/dense inference weights add on top of the cores (0 when every layer runs its cores)."""
    extra = 0
    for m in model.modules():
        if isinstance(m, MPOLinear) and m.merge != (1,) * len(m.sites):
            extra += mpo_num_params(*m.merged_layout()) * m.cores[0].element_size()
    return extra
