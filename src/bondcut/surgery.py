"""Model surgery: find a causal LM's SA/MLP matrices and replace them in place by MPOLinear layers."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .architectures import TargetMatch, find_targets
from .config import CompressConfig
from .mpo import MPO, bond_dims_for_chi, chi_for_fraction, decompose, mpo_num_params, resolve_sites
from .mpo.whiten import decompose_whitened
from .mpo_linear import MPOLinear
from .neurons import gated_mlps, narrow_mlp, neurons_for
from .patterns import matches, select

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What happened to one matrix."""

    name: str
    kind: str
    block: int | None
    shape: tuple[int, int]
    sites: list[list[int]]
    bond_dims: list[int]
    params_before: int
    params_after: int
    rel_error: float  # ||W - W_hat||_F / ||W||_F, from the discarded singular values
    seconds: float
    kept_dense: str = ""  # why the matrix was left as it was (empty when it became an MPO)


@dataclass
class CompressionReport:
    """Per-layer results and totals of one :func:`compress` call."""

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    uniform_chi: int | None = None
    plan: dict | None = None  # the allocation plan (bondcut.allocate.Plan.to_dict()), with profile allocation
    joint: dict | None = None  # with target_bytes: deleted blocks, embedding bits, the outer search's trials

    @property
    def target_params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def target_params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    def to_dict(self) -> dict:
        return {
            "uniform_chi": self.uniform_chi,
            "plan": self.plan,
            "joint": self.joint,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "target_params_before": self.target_params_before,
            "target_params_after": self.target_params_after,
            "layers": [asdict(r) for r in self.layers],
        }


def is_dense_layer(module: nn.Module) -> bool:
    """An nn.Linear or a transformers Conv1D: what bondcut can compress or pack."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight of an nn.Linear or a transformers Conv1D (which stores it transposed)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()  # Conv1D: y = x @ W + b with W (in, out)
    raise TypeError(f"cannot compress a {type(module).__name__}; only nn.Linear and transformers Conv1D")


def linear_with_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear computing x W^T + b for a given (out x in) weight: a stand-in while measuring."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    """The dotted name of ``module`` inside ``model`` (None if absent or None)."""
    return None if module is None else next((n for n, m in model.named_modules() if m is module), None)


def select_targets(model: nn.Module, config: CompressConfig) -> list[TargetMatch]:
    """The modules ``config`` asks to compress (architecture table or explicit names, then include/exclude)."""
    names = [n for n, m in model.named_modules() if is_dense_layer(m)]
    if config.modules is not None:
        chosen = select(list(config.modules), names, "modules")
        targets = [TargetMatch(n, "custom", None) for n in chosen]
    else:
        targets = find_targets(names, model.config.model_type)
    candidate_names = [t.name for t in targets]
    if config.include is not None:
        keep = set(select(config.include, candidate_names, "include"))
        targets = [t for t in targets if t.name in keep]
    if config.exclude:
        drop = set(select(config.exclude, candidate_names, "exclude"))
        targets = [t for t in targets if t.name not in drop]
    if not targets:
        raise ValueError("include/exclude left no module to compress")
    return targets


def _chi_for(config: CompressConfig, name: str) -> int | None:
    if not isinstance(config.chi, dict):
        return config.chi
    for pattern, chi in config.chi.items():
        if matches(pattern, name):
            return chi
    raise ValueError(f"module {name} matches no pattern of the chi dict {list(config.chi)}")


def break_even_chi(sites: tuple) -> int:
    """Largest chi at which the MPO still has no more entries than the dense matrix."""
    return chi_for_fraction(sites, 1.0)


def uniform_chi_for_ratio(layouts: list[tuple], ratio: float) -> int:
    """Largest single chi for all layers whose MPOs hold at most ``ratio`` of the layers' dense parameters.

    A layer whose chi would reach its break-even chi (:func:`break_even_chi`) stays dense and counts at its
    dense size: an MPO that saves nothing would only lose accuracy and speed.
    """
    sizes = [math.prod(a for a, _ in s) * math.prod(b for _, b in s) for s in layouts]
    budget = ratio * sum(sizes)
    caps = [break_even_chi(s) for s in layouts]

    def total(chi: int) -> int:
        return sum(size if chi >= cap else mpo_num_params(s, bond_dims_for_chi(s, chi))
                   for s, cap, size in zip(layouts, caps, sizes))  # fmt: skip

    if total(1) > budget:
        raise ValueError(f"ratio {ratio} is below what chi=1 gives ({total(1) / sum(sizes):.4f}); raise it")
    lo, hi = 1, max(caps)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
    return lo


def target_budget(model: nn.Module, weights: dict[str, torch.Tensor], config: CompressConfig) -> int:
    """Parameters the targets' weights may keep under ``config.ratio`` (of the targets, or of the whole model)."""
    dense = sum(w.numel() for w in weights.values())
    if config.ratio_of == "targets":
        return int(config.ratio * dense)
    total = sum(p.numel() for p in model.parameters())
    budget = int(config.ratio * total) - (total - dense)
    if budget <= 0:
        raise ValueError(f"ratio {config.ratio} of the whole model ({total:,} params) is less than what the "
                         f"untouched layers alone hold ({total - dense:,}); raise the ratio or use ratio_of='targets'")  # fmt: skip
    return budget


def compress(
    model: nn.Module,
    config: CompressConfig,
    on_layer: Callable[[LayerReport, int, int], None] | None = None,
    tokenizer=None,
    on_stage: Callable[[str, int, int], None] | None = None,
) -> CompressionReport:
    """Replace the selected SA/MLP matrices of ``model`` by :class:`MPOLinear`, in place.

    ``on_layer(report, index, total)`` is called after each layer and ``on_stage(stage, done, total)`` during
    the statistics, candidates, profile and search stages (the CLI draws its progress bars with them).
    With ``config.calibration_tokens`` the input statistics of every target are collected first (one pass of
    the original model over calibration text; ``tokenizer`` required) and each matrix is decomposed
    activation-aware (:func:`bondcut.mpo.whiten.decompose_whitened`). With ``ratio`` and profile allocation,
    :func:`bondcut.allocate.allocate` chooses every matrix's layout and chi; the plan is in the report.
    The MPO layout is written to ``model.config.quantization_config`` so :func:`bondcut.save` round-trips.
    """
    from .hf_integration import attach_layout_config

    targets = select_targets(model, config)
    modules = {t.name: model.get_submodule(t.name) for t in targets}
    weights = {name: dense_weight(mod).detach() for name, mod in modules.items()}
    report = CompressionReport(model_params_before=sum(p.numel() for p in model.parameters()))
    if (config.calibration_tokens or config.allocates or config.refit_tokens) and tokenizer is None:
        raise ValueError("activation-aware compression, profile allocation and refit need the tokenizer: "
                         "bondcut.compress(model, config, tokenizer=tok), or CompressConfig(..., allocation='uniform', "
                         "calibration_tokens=0)")  # fmt: skip
    mlps = gated_mlps(model) if config.mlp_neurons else []
    if config.mlp_neurons and not mlps:
        raise ValueError(f"mlp_neurons needs gated MLPs (gate/up/down projections); model_type "
                         f"{model.config.model_type!r} has none in bondcut's table: drop mlp_neurons")  # fmt: skip
    original = copy.deepcopy(model) if config.refit_tokens else None  # the refit's reference outputs
    covariances = {}
    if config.calibration_tokens:
        from .calibration import input_covariances

        progress = None if on_stage is None else lambda done, total: on_stage("statistics", done, total)
        covariances, _ = input_covariances(model, tokenizer, list(modules), tokens=config.calibration_tokens,
                                           on_window=progress)  # fmt: skip
    # the decisions consume the statistics; neuron selection needs the down projections' (the hidden activations')
    hidden_covs = {m.down: covariances[m.down] for m in mlps if m.down in covariances}
    joint = planned_neurons = None
    if config.target_bytes is not None:
        decide, joint = _joint_decisions(model, tokenizer, config, weights, covariances, report, on_stage)
    elif config.allocates:
        decide, planned_neurons = _allocated_decisions(model, tokenizer, config, weights, covariances, report,
                                                       on_stage, mlps, hidden_covs)  # fmt: skip
    else:
        decide = _fixed_decisions(model, config, weights, covariances, report)

    for index, target in enumerate(targets):
        start = time.perf_counter()
        module, weight = modules[target.name], weights[target.name]
        bias = getattr(module, "bias", None)
        params_before = weight.numel() + (0 if bias is None else bias.numel())
        mpo, reason = decide(target.name)
        if mpo is None:
            layer_report = LayerReport(target.name, target.kind, target.block, tuple(weight.shape), [], [],
                                       params_before, params_before, 0.0, time.perf_counter() - start, reason)  # fmt: skip
        else:
            kind = "conv1d" if type(module).__name__ == "Conv1D" else "linear"
            layer = MPOLinear.from_mpo(mpo, bias=None if bias is None else bias.detach(), source_kind=kind)
            set_submodule(model, target.name, layer)
            norm = float(torch.linalg.norm(weight.float()))
            weight_error = mpo.truncation_error  # plain TT-SVD: known from the discarded singular values
            if config.calibration_tokens:  # whitened: that figure is the output error; measure the weight error
                weight_error = float(torch.linalg.norm(weight.double() - mpo.to_dense().double()))
            layer_report = LayerReport(
                name=target.name,
                kind=target.kind,
                block=target.block,
                shape=tuple(weight.shape),
                sites=[list(s) for s in mpo.sites],
                bond_dims=list(mpo.bond_dims),
                params_before=params_before,
                params_after=layer.num_params,
                rel_error=weight_error / norm if norm else 0.0,
                seconds=time.perf_counter() - start,
            )
        report.layers.append(layer_report)
        log.debug("compressed %s: %s", target.name, layer_report)
        if on_layer is not None:
            on_layer(layer_report, index, len(targets))
    if config.mlp_neurons:
        _narrow_compressed_mlps(model, mlps, weights, hidden_covs, report, planned_neurons)
        hidden_covs.clear()
    if original is not None:
        from .refit import refit_sequential

        progress = None if on_stage is None else lambda done, total: on_stage("refit", done, total)
        refit_sequential(model, original, tokenizer, list(modules), tokens=config.refit_tokens, on_block=progress)
        del original
    pending = None
    if joint is not None:
        from .joint import apply_storage

        calibration = max(512, config.calibration_tokens or 0)
        packing = apply_storage(model, joint, config.joint_rounding, tokenizer, calibration, config.defer_packing,
                                config.joint_rotate)  # fmt: skip
        pending = packing if config.defer_packing else None
    report.model_params_after = sum(p.numel() for p in model.parameters())
    attach_layout_config(model, **({"plan": report.plan} if report.plan else {}), pending_packing=pending)
    return report


Decision = Callable[[str], tuple["MPO | None", str]]


def _narrow_compressed_mlps(
    model: nn.Module, mlps, weights, hidden_covs, report: CompressionReport, planned: dict[str, int] | None = None
) -> None:
    """Turn gated MLPs of ``mlps`` into neuron selections (:mod:`bondcut.neurons`), rewriting their three
    matrices' entries in ``report``: those the plan sized in neurons (``planned``: kept neurons by down
    projection), or without such a plan every MLP with a compressed matrix, at the same parameter count."""
    rows = {r.name: i for i, r in enumerate(report.layers)}
    for mlp in mlps:
        if any(name not in rows for name in mlp.names):
            continue  # part of this MLP was not a target: its matrices stay as compressed
        entries = [report.layers[rows[name]] for name in mlp.names]
        if planned is not None:
            keep = planned.get(mlp.down)
        elif any(e.params_after != e.params_before for e in entries):
            keep = neurons_for(sum(e.params_after for e in entries), *(model.get_submodule(n) for n in mlp.names))
        else:
            keep = None  # kept dense: nothing to spend differently
        if keep is None:
            continue
        start = time.perf_counter()
        narrowed = narrow_mlp(model, mlp, weights, hidden_covs[mlp.down], keep)
        seconds = (time.perf_counter() - start) / 3
        for entry, name, kept in zip(entries, mlp.names, (narrowed.gate, narrowed.up, narrowed.down)):
            original = weights[name].double()
            padded = torch.zeros_like(original)  # the kept entries in place, zeros for the dropped neurons
            if name == mlp.down:
                padded[:, narrowed.kept] = kept.double()
            else:
                padded[narrowed.kept] = kept.double()
            norm = float(torch.linalg.norm(original))
            module = model.get_submodule(name)
            report.layers[rows[name]] = replace(
                entry, sites=[list(site) for site in module.sites], bond_dims=[], params_after=module.num_params,
                rel_error=float(torch.linalg.norm(original - padded)) / norm if norm else 0.0,
                seconds=entry.seconds + seconds, kept_dense="",
            )  # fmt: skip


def _fixed_decisions(model, config: CompressConfig, weights, covariances, report: CompressionReport) -> Decision:
    """Per-matrix MPOs for a given chi/tol, or one uniform chi meeting ``ratio``."""
    layouts = {name: resolve_sites(*w.shape, config.sites) for name, w in weights.items()}
    if config.ratio is not None:
        ratio = target_budget(model, weights, config) / sum(w.numel() for w in weights.values())
        report.uniform_chi = uniform_chi_for_ratio(list(layouts.values()), ratio)
    elif isinstance(config.chi, int):
        report.uniform_chi = config.chi

    def decide(name: str):
        layout, weight = layouts[name], weights[name]
        chi = report.uniform_chi if config.ratio is not None else _chi_for(config, name)
        if config.ratio is not None and chi >= (even := break_even_chi(layout)):
            return None, f"chi {chi} >= break-even chi {even}: an MPO would save nothing"
        if name in covariances:
            cov = covariances.pop(name)
            return decompose_whitened(weight, cov, sites=layout, chi=chi, tol=config.tol, damping=config.damping), ""
        return decompose(weight, sites=layout, chi=chi, tol=config.tol), ""

    return decide


def _joint_decisions(model, tokenizer, config: CompressConfig, weights, covariances, report, on_stage):
    """Per-matrix layout, chi and precision, embedding precision and deleted blocks from the joint allocator."""
    from .candidates import build_candidates
    from .joint import allocate_joint

    progress = None if on_stage is None else lambda name, done, total: on_stage("candidates", done, total)
    candidates = build_candidates(weights, covariances or None, config.candidate_layouts, config.damping, progress,
                                  packing_bits=config.joint_bits, packing_groups=config.joint_group_sizes,
                                  packing_rounding=config.joint_rounding,
                                  packing_rotate=config.joint_rotate)  # fmt: skip
    joint = allocate_joint(model, tokenizer, candidates, config, on_stage)
    covariances.clear()
    report.plan = joint.plan.to_dict()
    report.joint = {k: v for k, v in joint.to_dict().items() if k != "plan"}

    def decide(name: str):
        choice = joint.plan.layers.get(name)
        if choice is None:
            return None, "its block is deleted by the joint plan"
        if choice.layout == "dense":
            return None, "kept dense by the joint plan" + (f" (packed to {choice.bits} bits)" if choice.bits else "")
        mpo = candidates[name].spectra[choice.layout].mpo(choice.chi)
        del candidates[name]
        return mpo, ""

    return decide, joint


def _allocated_decisions(
    model, tokenizer, config: CompressConfig, weights, covariances, report, on_stage, mlps=(), hidden_covs=None
) -> tuple[Decision, dict[str, int] | None]:
    """Per-matrix layout and chi from the profile-based allocation plan (dense where the plan keeps it); with
    ``config.mlp_neurons`` the gated MLPs ``mlps`` are priced as neuron selections inside the plan
    (:mod:`bondcut.neuron_pricing`), and their kept neurons by down projection come back too."""
    from .allocate import allocate
    from .candidates import build_candidates
    from .neuron_pricing import NEURONS, expand_plan, kept_neurons, mlp_items, priced_mlps

    progress = None if on_stage is None else lambda name, done, total: on_stage("candidates", done, total)
    priced = priced_mlps(mlps, list(weights), hidden_covs) if config.mlp_neurons else []
    in_items = {m.gate for m in priced} | {m.up for m in priced}  # priced inside their MLP's item: no spectra
    candidates = build_candidates({n: w for n, w in weights.items() if n not in in_items}, covariances or None,
                                  config.candidate_layouts, config.damping, progress)  # fmt: skip
    covariances.clear()  # the spectra hold what is needed; free the n x n statistics
    items = mlp_items(candidates, mlps, weights, hidden_covs) if config.mlp_neurons else None
    plan = allocate(model, tokenizer, candidates, target_budget(model, weights, config), config, on_stage, items)
    neurons = None
    if config.mlp_neurons:
        neurons = kept_neurons(plan, mlps)
        plan = expand_plan(plan, mlps, {name: tuple(w.shape) for name, w in weights.items()})
    report.plan = plan.to_dict()

    def decide(name: str):
        choice = plan.layers[name]
        if choice.layout == NEURONS:
            candidates.pop(name, None)  # the down projection's low-rank spectra served the profile only
            return None, f"narrowed to {choice.chi} hidden neurons by the allocation plan"
        if choice.layout == "dense":
            return None, "kept dense by the allocation plan: any MPO of it costs more predicted KL per parameter saved"
        mpo = candidates[name].spectra[choice.layout].mpo(choice.chi)
        del candidates[name]  # free its spectra as we go
        return mpo, ""

    return decide, neurons
