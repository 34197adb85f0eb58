"""What each matrix could become: (layout, bond dimension) options with their size and relative output error.

For every target matrix and every candidate 2-site layout, one (activation-aware) SVD prices all bond
dimensions (:func:`bondcut.mpo.two_site_spectrum`). The error of an option is the relative output error
||(W - W_hat) L||^2 / ||W L||^2 (C = L L^T, the damped input statistics; the plain weight error without
statistics): exact from the singular values when the input sits on one site (low rank), measured on the
rebuilt matrix for split-input layouts (balanced), whose whitening is only Kronecker-approximate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .mpo import SiteLayoutError, TwoSiteSpectrum, chi_for_fraction, two_site_spectrum
from .mpo.whiten import cholesky_factor
from .quant.packing import dequantize, quantize

LAYOUTS: dict[str, int | str] = {"lowrank": "lowrank", "balanced": 2}  # candidate name -> sites spec
# kept fractions at which split-input layouts are priced (each costs one rebuild and one error product)
SPLIT_INPUT_FRACTIONS = (0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75)
LOWRANK_CHI_STEP = 8  # low-rank options: every multiple of this chi (all priced exactly from one SVD)


@dataclass(frozen=True)
class Option:
    """One way to store a matrix: ``layout`` "dense" (chi None) or a candidate layout name at bond ``chi``."""

    layout: str
    chi: int | None
    params: int  # weight entries (cores, or the dense matrix); the bias is the same for every option
    error: float  # relative squared output error; 0 for dense
    bits: int | None = None  # storage: None = the model's float dtype, 8/4 = packed (bondcut.quant)
    nbytes: int = 0  # bytes stored at that precision (set by the joint allocator; 0 = not priced in bytes)


@dataclass
class MatrixCandidates:
    """A target's spectra per candidate layout and its priced options (dense first)."""

    name: str
    shape: tuple[int, int]
    spectra: dict[str, TwoSiteSpectrum] = field(default_factory=dict)
    options: list[Option] = field(default_factory=list)
    weight: torch.Tensor | None = field(default=None, repr=False)  # kept to price split-input layouts
    # (bits, group size) -> relative error of the dense matrix rounded to nearest
    packing_errors: dict[tuple[int, int], float] = field(default_factory=dict)
    # (bits, group size) -> relative error of the dense matrix packed the way the plan packs it (GPTQ: below)
    dense_packing_errors: dict[tuple[int, int], float] = field(default_factory=dict)
    # group size asked -> the group the dense matrix is packed in (GPTQ keeps groups inside rows: a divisor)
    dense_groups: dict[int, int] = field(default_factory=dict)
    # (bits, group size) -> the dense matrix as that packing stores it, read back (rotated back): what a search
    # measuring plans on real text runs in its place
    dense_packed_weights: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def price(self, layout: str, chi: int, output_error: OutputError | None = None) -> Option:
        """Size and relative error of ``layout`` at ``chi`` (split inputs need ``output_error``, the true metric)."""
        spectrum = self.spectra[layout]
        if spectrum.exact or output_error is None:
            error = spectrum.error_sq(chi) / spectrum.norm_sq
        else:
            error = output_error(spectrum.dense(chi))
        return Option(layout, chi, spectrum.params(chi), error)


class OutputError:
    """||(W - W_hat) L||^2 / ||W L||^2 for one W and the true factor L, in fp32 (pricing only); without a
    factor, the relative weight error.

    W L and its norm are computed once per matrix; each priced option then costs one product W_hat L.
    """

    def __init__(self, weight: torch.Tensor, factor: torch.Tensor | None) -> None:
        self.factor = None if factor is None else factor.float()
        self.whitened = weight.float() if factor is None else weight.float() @ self.factor  # (m, n): W L
        self.norm_sq = float((self.whitened**2).sum())

    def __call__(self, approx: torch.Tensor) -> float:
        diff = self.whitened - (approx.float() if self.factor is None else approx.float() @ self.factor)
        return float((diff**2).sum()) / self.norm_sq


def build_candidates(
    weights: dict[str, torch.Tensor],
    covariances: dict[str, torch.Tensor] | None,
    layouts: Sequence[str] = ("lowrank", "balanced"),
    damping: float = 1e-2,
    on_matrix: Callable[[str, int, int], None] | None = None,
    packing_bits: Sequence[int] = (),
    packing_groups: Sequence[int] = (64,),
    packing_rounding: str = "rtn",
    packing_rotate: bool = False,
) -> dict[str, MatrixCandidates]:
    """Spectra and priced options for every matrix in ``weights`` ({name: (out x in) weight}).

    ``layouts`` names entries of :data:`LAYOUTS`; a layout a shape cannot take (e.g. balanced for a prime
    dimension) is left out for that matrix. Options never exceed the dense size (those would save nothing).
    With ``packing_bits``, each entry also records the error of the dense matrix packed at those bits in groups of
    each of ``packing_groups`` (:mod:`bondcut.quant`), measured with the same metric: rounded to nearest
    (``packing_errors``, what one MPO core's rounding is priced from) and as ``packing_rounding`` packs the dense
    matrix (``dense_packing_errors``; "gptq" rounds activation-aware on the same input statistics;
    ``packing_rotate``: after rotating its inputs, :mod:`bondcut.quant.rotation`, as ``QuantizeConfig(rotate=True)``).
    """
    from .quant.apply import METHODS

    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not layouts:
        raise ValueError(f"unknown candidate layouts {unknown or list(layouts)}; choose from {list(LAYOUTS)}")
    if packing_rounding not in METHODS:
        raise ValueError(f"packing_rounding must be one of {METHODS}, got {packing_rounding!r}")
    result = {}
    for index, (name, weight) in enumerate(weights.items()):
        cov = None if covariances is None else covariances[name]
        metric = None if cov is None else OutputError(weight.detach(), cholesky_factor(cov, damping))
        entry = MatrixCandidates(name, tuple(weight.shape), weight=weight.detach())
        if packing_bits:
            (entry.packing_errors, entry.dense_packing_errors, entry.dense_groups,
             entry.dense_packed_weights) = _packing_errors(weight.detach(), cov, metric, packing_bits, packing_groups,
                                                           packing_rounding, packing_rotate)  # fmt: skip
        entry.options.append(Option("dense", None, entry.dense_params, 0.0))
        for layout in layouts:
            try:
                spectrum = two_site_spectrum(weight, LAYOUTS[layout], cov, damping)
            except SiteLayoutError:
                continue
            if layout == "balanced" and spectrum.layout == ((weight.shape[0], 1), (1, weight.shape[1])):
                continue  # the shape fell back to low rank
            entry.spectra[layout] = spectrum
            entry.options.extend(_options(entry, layout, metric))
        result[name] = entry
        if on_matrix is not None:
            on_matrix(name, index + 1, len(weights))
    return result


def _packing_errors(
    weight: torch.Tensor,
    cov: torch.Tensor | None,
    metric: OutputError | None,
    bits: Sequence[int],
    groups: Sequence[int],
    rounding: str,
    rotate: bool = False,
) -> tuple[
    dict[tuple[int, int], float], dict[tuple[int, int], float], dict[int, int], dict[tuple[int, int], torch.Tensor]
]:
    """Relative output errors of ``weight`` packed at each of ``bits`` x ``groups``: rounded to nearest, and as
    ``rounding`` packs it (GPTQ needs the input statistics ``cov``; without them it falls back to nearest), inputs
    rotated first with ``rotate``; per group asked, the group the packed dense matrix actually has (GPTQ keeps
    groups inside rows); and per format, the matrix as stored, read back in the weight's frame and dtype."""
    from .quant import rotation
    from .quant.apply import QuantizeConfig
    from .quant.gptq import quantize_aware

    metric = metric or OutputError(weight, None)
    formats = [(b, g) for b in bits for g in groups]
    nearest = {(b, g): quantize(weight, b, g) for b, g in formats}
    nearest_errors = {key: metric(dequantize(packed)) for key, packed in nearest.items()}
    block = rotation.rotation_block(weight.shape[1]) if rotate else 1
    if block == 1 and (rounding == "rtn" or cov is None):
        values = {key: dequantize(packed).to(weight.dtype) for key, packed in nearest.items()}
        return nearest_errors, dict(nearest_errors), {g: p.group_size for (_, g), p in nearest.items()}, values
    frame, back = weight, lambda values: values
    if block > 1:  # the stored matrix is W R^T; its error, rotated back, is what the layer's output sees
        signs = rotation.rotation_signs(weight.shape[1], rotation.DEFAULT_SEED)
        frame, back = rotation.rotate(weight, signs, block), lambda values: rotation.unrotate(values, signs, block)
        cov = None if cov is None else rotation.rotate_gram(cov, signs, block)
    if rounding == "rtn" or cov is None:
        stored = {(b, g): quantize(frame, b, g) for b, g in formats}
    else:
        damping = QuantizeConfig.damping  # the packing's own dampening, so the price matches what is stored
        stored = {(b, g): quantize_aware(frame, cov, b, g, damping) for b, g in formats}
    values = {key: back(dequantize(packed)).to(weight.dtype) for key, packed in stored.items()}
    stored_errors = {key: metric(value) for key, value in values.items()}
    return nearest_errors, stored_errors, {g: packed.group_size for (_, g), packed in stored.items()}, values


def _options(entry: MatrixCandidates, layout: str, metric: OutputError | None) -> list[Option]:
    """Priced options of one layout, smaller than the dense matrix."""
    spectrum = entry.spectra[layout]
    per_chi = spectrum.params(1)
    top = min(spectrum.max_chi, (entry.dense_params - 1) // per_chi)
    if spectrum.exact:
        chis = sorted({*range(LOWRANK_CHI_STEP, top + 1, LOWRANK_CHI_STEP), 1, top} - {0})
    else:
        chis = sorted({chi_for_fraction(spectrum.layout, f) for f in SPLIT_INPUT_FRACTIONS} | {top})
    return [entry.price(layout, chi, metric) for chi in chis if 1 <= chi <= top]
