"""Quantize what a model has left (embeddings, LM head, dense Linear layers, optionally MPO cores), in place.

:func:`quantize_model` swaps modules for their packed counterparts (:mod:`bondcut.quant.modules`) and returns
the layouts, which ride in ``config.json`` next to the MPO layout. Dense Linear layers and the LM head round to
nearest (``method="rtn"``) or activation-aware (``method="gptq"``, :mod:`bondcut.quant.gptq`, on the input
statistics of calibration tokens; same packed format; a tied embedding is rounded for the head's inputs, and
low-rank MPO pairs (sites (m x 1)(1 x n)) are rounded factor by factor, :func:`.gptq.quantize_low_rank_aware`);
other MPO cores and an untied embedding round to nearest. ``rotate=True`` first turns each dense Linear layer's W into
W R^T for a random block Hadamard R and rotates its inputs at run time (:mod:`bondcut.quant.rotation`): the same
function in float, less rounding error. The embedding's rows are rotated so too (a lookup unrotates the rows it
reads; a tied head rotates its input): on SmolLM2-135M, int4 groups of 64, rounding the tied table alone cost
KL 0.101 to nearest, 0.048 by GPTQ and 0.022 by GPTQ after rotation (4,096 unseen calibration tokens). :func:`install_quant_layers` rebuilds the empty packed modules
from them before transformers loads the weights. A tied LM head stays tied: it reads the packed embedding,
stored once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..mpo_linear import MPOLinear
from ..surgery import dense_weight, is_dense_layer, name_of, set_submodule
from .gptq import is_low_rank_pair, quantize_aware, quantize_low_rank_aware
from .modules import (
    EMBEDDING_KINDS,
    QUANT_LAYERS,
    QuantEmbedding,
    QuantLinear,
    QuantMPOLinear,
    TiedQuantHead,
    TieredQuantEmbedding,
)
from .packing import DEFAULT_GROUP, PER_ROW, PackedTensor, check_bits, dequantize, group_dividing, quantize, row_group
from .rotation import DEFAULT_SEED, rotate, rotate_gram, rotation_block, rotation_signs, unrotate
from .tiers import RowTiers, corpus_usage

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize and how. ``cores`` also packs the MPO cores; embeddings and head are on by default.
    ``group_size=0``: one scale and offset per row of each Linear weight, the embedding and head (cores keep
    groups of 64); int8 that way runs through PyTorch's int8 CPU kernel."""

    bits: int = 4
    group_size: int = 64
    cores: bool = False
    embeddings: bool = True
    linear: bool = True
    only: tuple[str, ...] | None = None  # pack exactly these Linear/MPO modules (by name), whatever ``cores`` says
    method: str = "rtn"  # dense Linear layers: "rtn" (round to nearest) or "gptq" (activation-aware; needs text)
    calibration_tokens: int = 16384  # gptq: tokens of the calibration split whose input statistics guide rounding
    damping: float = 0.1  # gptq: fraction of H's mean diagonal added to it (more = closer to round-to-nearest)
    rotate: bool = False  # pack W R^T (dense Linear layers, the embedding) and rotate inputs by R (.rotation)
    embedding_tiers: str | None = None  # the embedding's rows at several widths, e.g. "8:0.1,4:0.9" (.tiers)

    def __post_init__(self) -> None:
        check_bits(self.bits, self.group_size, per_row_allowed=True)
        if self.embedding_tiers is not None:
            for bits in RowTiers.parse(self.embedding_tiers).widths:
                check_bits(bits, self.group_size, per_row_allowed=True)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}; example: --method gptq")
        if self.method == "gptq" and self.calibration_tokens < 512:
            raise ValueError(f"gptq needs at least 512 calibration tokens, got {self.calibration_tokens}")


@dataclass
class QuantizeReport:
    """Bytes each kind of module held before (weights and biases, in their dtype) and after packing."""

    layouts: dict[str, dict] = field(default_factory=dict)
    bytes_before: dict[str, int] = field(default_factory=dict)
    bytes_after: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, before: int, after: int) -> None:
        self.bytes_before[kind] = self.bytes_before.get(kind, 0) + before
        self.bytes_after[kind] = self.bytes_after.get(kind, 0) + after


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _rounded_rows(weight: torch.Tensor, config: QuantizeConfig, group: int, gram: torch.Tensor | None = None
                  ) -> tuple[PackedTensor, tuple[int, int] | None]:  # fmt: skip
    """``weight``'s rows packed (GPTQ on ``gram`` when given, else to nearest) and the rotation they hold: with
    ``config.rotate`` the rows of W R^T, whose inputs R x have Gram matrix R G R^T (None: W itself)."""
    block = rotation_block(weight.shape[1]) if config.rotate else 1
    rotation = None if block == 1 else (block, DEFAULT_SEED)
    if rotation is not None:
        signs = rotation_signs(weight.shape[1], DEFAULT_SEED)
        weight = rotate(weight.detach(), signs, block)
        gram = None if gram is None else rotate_gram(gram, signs, block)
    if gram is None:
        return quantize(weight, config.bits, group), rotation
    return quantize_aware(weight, gram, config.bits, group, config.damping), rotation


def rounded_table(weight: torch.Tensor, bits: int, group_size: int, gram: torch.Tensor | None = None,
                  rotate: bool = False) -> torch.Tensor:  # fmt: skip
    """The values a lookup in ``weight`` (an embedding table, rows of width n) reads once it is packed as
    :func:`quantize_model` packs it: rows in the largest group <= ``group_size`` dividing n, GPTQ on the head's
    input Gram matrix ``gram`` (a tied table) or to nearest, rotated first with ``rotate``; unrotated again."""
    method = "rtn" if gram is None else "gptq"
    config = QuantizeConfig(bits=bits, group_size=group_size, method=method, rotate=rotate)
    packed, rotation = _rounded_rows(weight, config, group_dividing(weight.shape[1], group_size, bits), gram)
    values = dequantize(packed).to(weight.dtype)
    if rotation is None:
        return values
    return unrotate(values, rotation_signs(weight.shape[1], rotation[1]).to(values.device), rotation[0])


def _packed_linear(module: nn.Module, config: QuantizeConfig, gram: torch.Tensor | None = None) -> QuantLinear:
    weight = dense_weight(module)
    packed, rotation = _rounded_rows(weight, config, row_group(config.group_size, weight.shape[1]), gram)
    return QuantLinear(packed, module.bias, weight.dtype, rotation)


def gram_matrices(model: nn.Module, tokenizer, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """Input Gram matrices of the dense Linear layers ``quantize_model(model, config)`` would pack, and of the LM
    head (whose error reaches the logits directly; a tied embedding is rounded for the head's inputs), from the
    model as it is now: one calibration pass."""
    from ..calibration import input_covariances

    head_name = name_of(model, model.get_output_embeddings())
    if tokenizer is None:
        raise ValueError("method='gptq' rounds on calibration text: pass the tokenizer (quantize_model(model, "
                         "config, tokenizer=tok)), or use method='rtn'")  # fmt: skip
    only = None if config.only is None else set(config.only)
    names = [n for n, m in model.named_modules()
             if config.linear and is_dense_layer(m) and n != head_name and (only is None or n in only)]  # fmt: skip
    names += [n for n, m in model.named_modules()
              if _low_rank(m) and (n in only if only is not None else config.cores)]  # fmt: skip
    if config.embeddings and head_name and is_dense_layer(model.get_submodule(head_name)):
        names.append(head_name)
    return input_covariances(model, tokenizer, names, tokens=config.calibration_tokens)[0] if names else {}


def _packed_embedding(embedding: nn.Embedding, config: QuantizeConfig, gram: torch.Tensor | None) -> QuantEmbedding:
    weight = embedding.weight
    group = group_dividing(weight.shape[1], row_group(config.group_size, weight.shape[1]), config.bits)
    packed, rotation = _rounded_rows(weight, config, group, gram)
    return QuantEmbedding(packed, embedding.padding_idx, weight.dtype, rotation)


def _tiered_embedding(embedding: nn.Embedding, config: QuantizeConfig, gram: torch.Tensor | None,
                      usage: torch.Tensor) -> TieredQuantEmbedding:  # fmt: skip
    """The table packed in ``config.embedding_tiers``, its rows ranked by ``usage``; each tier's rows rounded as a
    whole table at that width would round them (GPTQ rounds rows independently)."""
    weight = embedding.weight
    tiers = RowTiers.parse(config.embedding_tiers)
    row_tier = tiers.assign(usage)
    parts, rotation = [], None
    for t, bits in enumerate(tiers.widths):
        rows = (row_tier == t).nonzero().squeeze(1)
        width_config = replace(config, bits=bits, embedding_tiers=None)
        group = group_dividing(weight.shape[1], row_group(config.group_size, weight.shape[1]), bits)
        packed, rotation = _rounded_rows(weight[rows], width_config, group, gram)
        parts.append(packed)
    return TieredQuantEmbedding(parts, row_tier, embedding.padding_idx, weight.dtype, rotation)


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig,
    tokenizer=None,
    grams: dict[str, torch.Tensor] | None = None,
    usage: torch.Tensor | None = None,
) -> QuantizeReport:
    """Replace embeddings, LM head, dense Linear layers (and, with ``config.cores``, MPO layers) by packed ones.

    ``method="gptq"`` needs the ``tokenizer`` (its calibration text), or ``grams`` from :func:`gram_matrices`
    collected beforehand (several calls then share one calibration pass; each uses up the entries it packs).
    ``config.embedding_tiers`` ranks the embedding's rows by ``usage`` (:func:`bondcut.quant.tiers.row_usage`;
    None: counted here on the corpus, :func:`bondcut.quant.tiers.corpus_usage`)."""
    report = QuantizeReport()
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embedding_name, head_name = name_of(model, embedding), name_of(model, head)
    tied = head is not None and isinstance(embedding, nn.Embedding) and head.weight is embedding.weight

    def swap(kind: str, name: str, old: nn.Module, new: nn.Module) -> None:
        report.add(kind, _tensor_bytes(*old.parameters()), _tensor_bytes(*_buffers(new)))
        set_submodule(model, name, new)
        report.layouts[name] = new.layout()

    if grams is None:
        gptq = config.method == "gptq" and (config.linear or config.embeddings)
        grams = gram_matrices(model, tokenizer, config) if gptq else {}
    only = None if config.only is None else set(config.only)
    for name, module in list(model.named_modules()):
        if name == head_name or (only is not None and name not in only):
            continue
        if config.linear and is_dense_layer(module):
            swap("linear", name, module, _packed_linear(module, config, grams.pop(name, None)))
        elif (config.cores or only is not None) and isinstance(module, MPOLinear):
            group = DEFAULT_GROUP if config.group_size == PER_ROW else config.group_size
            gram = grams.pop(name, None)
            if gram is not None and _low_rank(module):
                packed = quantize_low_rank_aware(list(module.cores), gram, config.bits, group, config.damping)
            else:
                packed = [quantize(c, config.bits, group) for c in module.cores]
            swap("mpo_cores", name, module, QuantMPOLinear.from_layer(module, packed))

    if config.embeddings and isinstance(embedding, nn.Embedding):
        gram = grams.pop(head_name, None) if tied else None
        tiers = None if config.embedding_tiers is None else RowTiers.parse(config.embedding_tiers)
        if tiers is None or len(tiers.tiers) == 1:
            width = config.bits if tiers is None else tiers.widths[0]
            new_embedding = _packed_embedding(embedding, replace(config, bits=width), gram)
        else:
            if usage is None and tokenizer is None:
                raise ValueError("embedding_tiers ranks rows by their use on calibration text: pass the tokenizer "
                                 "(quantize_model(model, config, tokenizer=tok)) or usage")  # fmt: skip
            usage = corpus_usage(model, tokenizer) if usage is None else usage
            new_embedding = _tiered_embedding(embedding, config, gram, usage)
        scale = getattr(embedding, "embed_scale", None)  # Gemma multiplies embeddings by sqrt(hidden)
        new_embedding.output_scale = float(scale) if scale is not None else 1.0
        swap("embedding", embedding_name, embedding, new_embedding)
        if tied:
            set_submodule(model, head_name, TiedQuantHead(new_embedding, embedding_name))
            report.layouts[head_name] = model.get_submodule(head_name).layout()
            _untie(model)
    if head is not None and not tied and config.embeddings and is_dense_layer(head):
        swap("lm_head", head_name, head, _packed_linear(head, config, grams.pop(head_name, None)))
    return report


def _low_rank(module: nn.Module) -> bool:
    """An MPO layer that is a plain low-rank pair (its cores can be rounded activation-aware)."""
    return isinstance(module, MPOLinear) and is_low_rank_pair(module.sites, [c.shape for c in module.cores])


def _buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers()] + [p for p in module.parameters()]


def _untie(model: nn.Module) -> None:
    """Tell transformers not to tie lm_head.weight to the embedding: the packed head already reads it."""
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None:
        text_config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}


def install_quant_layers(model: nn.Module, layouts: dict[str, dict]) -> None:
    """Swap each named module for an empty packed layer of the recorded layout, before weights load."""
    dtype = next(model.parameters()).dtype
    embeddings: dict[str, QuantEmbedding | TieredQuantEmbedding] = {}
    for name, layout in sorted(layouts.items(), key=lambda item: item[1]["kind"] == "tied_head"):
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"config.json lists quantized layer {name!r}, which this model does not have") from err
        if layout["kind"] == "tied_head":
            new = TiedQuantHead(embeddings[layout["embedding"]], layout["embedding"])
        elif layout["kind"] in QUANT_LAYERS:
            new = QUANT_LAYERS[layout["kind"]].empty(layout, dtype)
            if layout["kind"] in EMBEDDING_KINDS:
                new.output_scale = float(layout.get("output_scale", 1.0))
                embeddings[name] = new
        else:
            raise ValueError(f"quantized layer {name!r} has unknown kind {layout['kind']!r}; upgrade bondcut")
        set_submodule(model, name, new)
    if any(layout["kind"] == "tied_head" for layout in layouts.values()):
        _untie(model)


def quant_layouts(model: nn.Module) -> dict[str, dict]:
    """The layout of every packed layer in ``model``, keyed by module name."""
    return {n: m.layout() for n, m in model.named_modules() if isinstance(m, (*QUANT_LAYERS.values(), TiedQuantHead))}
