"""Layer sensitivity: how much the calibration loss grows when only one matrix is compressed.

For every SA/MLP matrix and every kept-parameter fraction of a grid, the matrix alone is replaced by its
(activation-aware) 2-site MPO at that size, the mean next-token loss on calibration windows is measured, and
the matrix is put back. One SVD per matrix prices every size (:func:`bondcut.mpo.two_site_spectrum`), and only
the blocks from the changed one onward are rerun (:class:`bondcut.replay.BlockReplay`). Cost: one forward
pass per (matrix, fraction), about half a full pass on average, plus one full pass for the baseline. Results
are written after every matrix to a JSON file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from .cache import atomic_write_text
from .calibration import calibration_windows, input_covariances
from .config import CompressConfig
from .mpo import TwoSiteSpectrum, chi_for_fraction, two_site_spectrum
from .replay import BlockReplay
from .surgery import dense_weight, linear_with_weight, select_targets, set_submodule

PROFILE_VERSION = 3


@dataclass
class LayerSensitivity:
    """Loss increase of one matrix at each fraction of its parameters kept."""

    name: str
    shape: tuple[int, int]
    sites: list[list[int]]
    chi: list[int]
    params: list[int]
    delta_loss: list[float]
    kl: list[float]  # mean KL(original || compressed) per token, nats: the low-noise measure the allocator fits
    error: list[float]  # relative squared output error ||(W - W_hat) L||^2 / ||W L||^2 (weight error if plain)


@dataclass
class Profile:
    """The sensitivity grid of a model, with how it was measured."""

    fractions: list[float]
    sites: str | int
    calibration_tokens: int
    context: int
    activation_aware: bool
    covariance_tokens: int
    damping: float
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


def profile(
    model: nn.Module,
    tokenizer,
    fractions: Sequence[float] = (0.1, 0.3),
    sites: str | int = "lowrank",
    calibration_tokens: int = 512,
    context: int = 512,
    activation_aware: bool = True,
    include: Sequence[str] | None = None,
    cache: str | os.PathLike | None = None,
    on_layer: Callable[[str, int, int], None] | None = None,
    covariance_tokens: int | None = None,
    damping: float = 1e-2,
    spectra: dict[str, TwoSiteSpectrum] | None = None,
) -> Profile:
    """Measure every target matrix's loss increase at each kept fraction; resumes from ``cache`` if given.

    ``sites`` is a 2-site layout ("lowrank", 2, or two pairs). The input statistics use ``covariance_tokens``
    calibration tokens (default: ``calibration_tokens``); ``spectra`` ({name: spectrum}) may be given by a
    caller that already has them (compress), and must then match ``sites`` and those statistics.
    """
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), e.g. (0.1, 0.25, 0.5), got {list(fractions)}")
    context = min(context, calibration_tokens)  # a short calibration budget is one shorter window
    covariance_tokens = calibration_tokens if covariance_tokens is None else covariance_tokens
    settings = {"fractions": sorted(float(f) for f in fractions), "sites": sites, "calibration_tokens": calibration_tokens,
                "context": context, "activation_aware": activation_aware,
                "covariance_tokens": covariance_tokens if activation_aware else 0, "damping": damping}  # fmt: skip
    result = Profile(**settings)
    if cache is not None and Path(cache).exists():
        stored = json.loads(Path(cache).read_text())
        if stored.get("version") == PROFILE_VERSION and {k: stored.get(k) for k in settings} == settings:
            result = Profile.from_dict(stored)  # same question: resume
    targets = [t.name for t in select_targets(model, CompressConfig(chi=1, include=list(include) if include else None))]
    todo = [n for n in targets if n not in result.layers]
    start = time.perf_counter() - result.seconds
    covariances = {}
    if activation_aware and todo and spectra is None:
        covariances, _ = input_covariances(model, tokenizer, todo, tokens=covariance_tokens, context=context)
    runner = BlockReplay(model, calibration_windows(tokenizer, calibration_tokens, context), targets)
    if todo or math.isnan(result.base_loss):
        base = runner.record(as_reference=True)
        if math.isnan(result.base_loss):
            result.base_loss = base.loss
            result.forward_passes += 1
    for index, name in enumerate(targets):
        if on_layer is not None:
            on_layer(name, index, len(targets))
        if name in result.layers:
            continue
        module = model.get_submodule(name)
        weight = dense_weight(module).detach()
        spectrum = (
            spectra[name]
            if spectra is not None
            else two_site_spectrum(weight, sites, covariances.pop(name, None), damping)
        )
        entry = LayerSensitivity(name, tuple(weight.shape), [list(s) for s in spectrum.layout], [], [], [], [], [])
        for fraction in result.fractions:
            chi = chi_for_fraction(spectrum.layout, fraction)
            set_submodule(model, name, linear_with_weight(spectrum.dense(chi), getattr(module, "bias", None)))
            try:
                score = runner.score(runner.block_of(name))
            finally:
                set_submodule(model, name, module)
            result.forward_passes += 1
            entry.chi.append(chi)
            entry.params.append(spectrum.params(chi))
            entry.delta_loss.append(score.loss - result.base_loss)
            entry.kl.append(score.kl)
            entry.error.append(spectrum.error_sq(chi) / spectrum.norm_sq)
        result.layers[name] = entry
        result.seconds = time.perf_counter() - start
        if cache is not None:
            atomic_write_text(cache, json.dumps(result.to_dict(), indent=1))
    if on_layer is not None:
        on_layer("", len(targets), len(targets))
    result.seconds = time.perf_counter() - start
    return result
