"""Layer sensitivity: how much the calibration loss grows when only one matrix is compressed.

For every SA/MLP matrix and every kept-parameter fraction of a grid, the matrix alone is replaced by its MPO
(the layout and, optionally, the activation-aware decomposition that ``compress`` would use), the mean
next-token loss on calibration windows is measured, and the matrix is put back. Cost: one forward pass over
the calibration tokens per (matrix, fraction), plus one for the baseline. Results are written after every
matrix to a JSON file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cache import atomic_write_text
from .calibration import calibration_windows, input_covariances
from .config import CompressConfig
from .mpo import bond_dims_for_chi, chi_for_fraction, decompose, mpo_num_params, resolve_sites
from .mpo.whiten import decompose_whitened
from .mpo_linear import MPOLinear
from .surgery import dense_weight, select_targets, set_submodule

PROFILE_VERSION = 1


@dataclass
class LayerSensitivity:
    """Loss increase of one matrix at each fraction of its parameters kept."""

    name: str
    shape: tuple[int, int]
    sites: list[list[int]]
    chi: list[int]
    params: list[int]
    delta_loss: list[float]


@dataclass
class Profile:
    """The sensitivity grid of a model, with how it was measured."""

    fractions: list[float]
    sites: str | int
    calibration_tokens: int
    context: int
    activation_aware: bool
    base_loss: float = math.nan
    forward_passes: int = 0
    seconds: float = 0.0
    layers: dict[str, LayerSensitivity] = field(default_factory=dict)
    version: int = PROFILE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        layers = {k: LayerSensitivity(**{**v, "shape": tuple(v["shape"])}) for k, v in data.pop("layers").items()}
        return cls(**data, layers=layers)


def _loss(model: nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(float(model(w[None], labels=w[None]).loss) for w in windows) / len(windows)


def profile(
    model: nn.Module,
    tokenizer,
    fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75),
    sites: str | int = "lowrank",
    calibration_tokens: int = 1024,
    context: int = 512,
    activation_aware: bool = True,
    include: Sequence[str] | None = None,
    cache: str | os.PathLike | None = None,
    on_layer: Callable[[str, int, int], None] | None = None,
) -> Profile:
    """Measure every target matrix's loss increase at each kept fraction; resumes from ``cache`` if given."""
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), e.g. (0.1, 0.25, 0.5), got {list(fractions)}")
    context = min(context, calibration_tokens)  # a short calibration budget is one shorter window
    settings = {"fractions": sorted(float(f) for f in fractions), "sites": sites, "calibration_tokens": calibration_tokens,
                "context": context, "activation_aware": activation_aware}  # fmt: skip
    result = Profile(**settings)
    if cache is not None and Path(cache).exists():
        stored = Profile.from_dict(json.loads(Path(cache).read_text()))
        if {k: getattr(stored, k) for k in settings} == settings and stored.version == PROFILE_VERSION:
            result = stored  # same question: resume
    targets = [t.name for t in select_targets(model, CompressConfig(chi=1, include=list(include) if include else None))]
    windows = calibration_windows(tokenizer, calibration_tokens, context)
    start = time.perf_counter() - result.seconds
    if math.isnan(result.base_loss):
        result.base_loss = _loss(model, windows)
        result.forward_passes += 1
    covariances = {}
    if activation_aware and len(result.layers) < len(targets):
        todo = [n for n in targets if n not in result.layers]
        covariances, _ = input_covariances(model, tokenizer, todo, tokens=calibration_tokens, context=context)
    for index, name in enumerate(targets):
        if on_layer is not None:
            on_layer(name, index, len(targets))
        if name in result.layers:
            continue
        module = model.get_submodule(name)
        weight = dense_weight(module).detach()
        layout = resolve_sites(*weight.shape, sites)
        bias = getattr(module, "bias", None)
        entry = LayerSensitivity(name, tuple(weight.shape), [list(s) for s in layout], [], [], [])
        for fraction in result.fractions:
            chi = chi_for_fraction(layout, fraction)
            if name in covariances:
                mpo = decompose_whitened(weight, covariances[name], sites=layout, chi=chi)
            else:
                mpo = decompose(weight, sites=layout, chi=chi)
            set_submodule(model, name, MPOLinear.from_mpo(mpo, bias=None if bias is None else bias.detach()))
            try:
                loss = _loss(model, windows)
            finally:
                set_submodule(model, name, module)
            result.forward_passes += 1
            entry.chi.append(chi)
            entry.params.append(mpo_num_params(layout, bond_dims_for_chi(layout, chi)))
            entry.delta_loss.append(loss - result.base_loss)
        covariances.pop(name, None)
        result.layers[name] = entry
        result.seconds = time.perf_counter() - start
        if cache is not None:
            atomic_write_text(cache, json.dumps(result.to_dict(), indent=1))
    if on_layer is not None:
        on_layer("", len(targets), len(targets))
    result.seconds = time.perf_counter() - start
    return result
