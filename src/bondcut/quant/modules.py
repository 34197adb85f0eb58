"""Layers whose weights are stored packed (8, 4, 3 or 2 bits, group-wise) and dequantized on the fly in forward.

Each packed tensor is three buffers (``codes``, ``scale``, ``offset``), so ``state_dict``/safetensors hold the
packed bytes and the file shrinks. Forward dequantizes the weight for that call only (nothing float is kept),
so memory is the packed size too; the price is one dequantization per call. On CPU, int4 Linear layers and
the tied head (and int8 ones with one group per row) multiply by the codes directly instead
(:mod:`bondcut.quant.kernels`). ``layout()`` is the JSON that
rebuilds the empty layer before weights load (see :mod:`bondcut.quant.apply`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..mpo import Sites, contract, cores_to_dense, plan_contraction
from .dense_cache import exact_weight
from .kernels import kernel_applies, kernel_linear
from .memo import VersionMemo
from .packing import PackedTensor, dequantize, dequantize_groups, storage_shapes
from .rotation import rotate, rotation_signs, unrotate


def _register_packed(module: nn.Module, prefix: str, packed: PackedTensor) -> None:
    module.register_buffer(f"{prefix}codes", packed.codes)
    module.register_buffer(f"{prefix}scale", packed.scale)
    module.register_buffer(f"{prefix}offset", packed.offset)


RANGE_SUFFIXES = ("scale", "offset")


class _ScaleGain(nn.Module):
    """scale -> scale * (1 + gain): a relative change, so one learning rate suits every group size and width."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(shape))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.float() * (1 + self.gain)


class _OffsetShift(nn.Module):
    """offset -> offset + shift * (the group's range at the start): shifts in units of the grid's span."""

    def __init__(self, span: torch.Tensor):
        super().__init__()
        self.register_buffer("span", span.detach().float().clone())
        self.shift = nn.Parameter(torch.zeros_like(self.span))

    def forward(self, offset: torch.Tensor) -> torch.Tensor:
        return offset.float() + self.shift * self.span


def _range_names(module: nn.Module) -> list[tuple[str, str]]:
    """(scale name, offset name) of each packed tensor the module holds directly."""
    return [(n, n[: -len("scale")] + "offset") for n, _ in module.named_buffers(recurse=False) if n.endswith("scale")]


def ranges_to_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Make this packed layer's per-group scales and offsets trainable (the codes stay fixed): healing a packed
    model that way moves each group's grid, PEQA-style, and the file format does not change. Trained as a relative
    gain on each scale and a shift of each offset in units of its range (torch parametrizations: every reader of
    ``module.scale`` sees the trained value), so one learning rate fits int8 and int4."""
    made = []
    levels = (1 << module.bits) - 1
    for scale_name, offset_name in _range_names(module):
        scale = getattr(module, scale_name)
        gain, shift = _ScaleGain(scale.shape), _OffsetShift(scale.float() * levels)
        parametrize.register_parametrization(module, scale_name, gain, unsafe=True)
        parametrize.register_parametrization(module, offset_name, shift, unsafe=True)
        made += [gain.gain, shift.shift]
    return made


def ranges_to_buffers(module: nn.Module) -> None:
    """Inverse of :func:`ranges_to_parameters`: the trained scales and offsets become fp16 buffers, as stored."""
    if not parametrize.is_parametrized(module):
        return
    for name in [n for n in list(module.parametrizations) if n.endswith(RANGE_SUFFIXES)]:
        value = getattr(module, name).detach().half()
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        getattr(module, name).copy_(value)


def _empty_packed(shape: tuple[int, ...], bits: int, group_size: int, device=None) -> PackedTensor:
    nbytes, groups = storage_shapes(shape, bits, group_size)
    return PackedTensor(
        torch.zeros(nbytes, dtype=torch.uint8, device=device),
        torch.zeros(groups, dtype=torch.float16, device=device),
        torch.zeros(groups, dtype=torch.float16, device=device),
        tuple(shape),
        bits,
        group_size,
    )


def _packed(module: nn.Module, prefix: str, shape: tuple[int, ...]) -> PackedTensor:
    """The module's packed tensor ``prefix`` (its scale and offset may be trainable float32 while healing)."""
    get = lambda name: getattr(module, f"{prefix}{name}")  # noqa: E731
    return PackedTensor(get("codes"), get("scale"), get("offset"), shape, module.bits, module.group_size)


def dequantized_rows(module: nn.Module, shape: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``module``'s packed (rows x width) table, dequantized alone (groups never straddle rows)."""
    rows, width = shape
    codes = module.codes.view(rows, -1)[index]  # (..., bytes per row)
    groups = width // module.group_size
    scale = module.scale.view(rows, groups)[index]  # (..., groups)
    offset = module.offset.view(rows, groups)[index]
    return dequantize_groups(codes, scale, offset, module.bits, module.group_size, module.compute_dtype)


def packed_product(module: nn.Module, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """x @ W^T for ``module``'s packed (out x in) weight: through the CPU kernel where it applies, else by
    dequantizing W (once per :func:`~bondcut.quant.dense_cache.dequantize_once` block)."""
    if kernel_applies(module, shape, x):
        return kernel_linear(x, module, shape)
    return F.linear(x, exact_weight(module).to(x.dtype))


def rotation_of(layout: dict) -> tuple[int, int] | None:
    """A packed layer's (block, seed) rotation as its layout records it; None for an unrotated one."""
    rotation = layout.get("rotation")
    return None if rotation is None else (int(rotation["block"]), int(rotation["seed"]))


class _RotatedRows:
    """For a packed layer whose rows hold W R^T (:mod:`bondcut.quant.rotation`): R stored as (block, seed) only,
    its signs rebuilt from the seed at first use, not at construction (a model built on the meta device to load
    weights into would otherwise keep empty ones)."""

    rotation: tuple[int, int] | None

    def _set_rotation(self, rotation: tuple[int, int] | None, width: int) -> None:
        self.rotation = None if rotation is None else (int(rotation[0]), int(rotation[1]))
        self._rotation_width = width
        self._signs: torch.Tensor | None = None

    def _rotation_signs(self, device: torch.device) -> torch.Tensor:
        if self._signs is None or self._signs.device != device:
            self._signs = rotation_signs(self._rotation_width, self.rotation[1]).to(device)
        return self._signs

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """R x: what a product with the stored rows W R^T needs to give W x (x itself when unrotated)."""
        return x if self.rotation is None else rotate(x, self._rotation_signs(x.device), self.rotation[0])

    def unrotate_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows w R^T back to w (an embedding lookup's rows)."""
        return rows if self.rotation is None else unrotate(rows, self._rotation_signs(rows.device), self.rotation[0])

    def _rotation_layout(self) -> dict:
        return {} if self.rotation is None else {"rotation": {"block": self.rotation[0], "seed": self.rotation[1]}}

    def _rotation_repr(self) -> str:
        return "" if self.rotation is None else f", rotation block={self.rotation[0]}"


class QuantLinear(_RotatedRows, nn.Module):
    """y = x W^T + b with W (out x in) stored packed; replaces ``nn.Linear`` (and GPT-2 ``Conv1D``)."""

    def __init__(
        self,
        packed: PackedTensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype = torch.float32,
        rotation: tuple[int, int] | None = None,
    ):
        """``rotation`` (block, seed): ``packed`` holds W R^T and inputs are rotated by R first
        (:mod:`bondcut.quant.rotation`); None: it holds W."""
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.bits, self.group_size = packed.bits, packed.group_size
        self.compute_dtype = compute_dtype
        _register_packed(self, "", packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._set_rotation(rotation, self.in_features)

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype, device=None) -> QuantLinear:
        bias = torch.zeros(layout["shape"][0], dtype=dtype, device=device) if layout["bias"] else None
        packed = _empty_packed(tuple(layout["shape"]), layout["bits"], layout["group_size"], device)
        return cls(packed, bias, dtype, rotation_of(layout))

    @property
    def packed_numel(self) -> int:
        """Weight entries held packed (buffers, not parameters)."""
        return self.out_features * self.in_features

    def weight_values(self) -> torch.Tensor:
        return dequantize(_packed(self, "", (self.out_features, self.in_features)), self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = packed_product(self, self.rotate_input(x), (self.out_features, self.in_features))
        return out if bias is None else out + bias

    def layout(self) -> dict:
        layout = {"kind": "linear", "shape": [self.out_features, self.in_features], "bits": self.bits,
                  "group_size": self.group_size, "bias": self.bias is not None}  # fmt: skip
        return {**layout, **self._rotation_layout()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group_size}{self._rotation_repr()}")  # fmt: skip


class QuantEmbedding(_RotatedRows, nn.Module):
    """Token embedding with rows stored packed; a lookup dequantizes only the rows it reads. With ``rotation``
    (block, seed) the rows hold e R^T (rounded so, as a rotated Linear's): a lookup unrotates the rows it reads and
    a tied head rotates its input, so the table is stored once and computes what e does."""

    def __init__(
        self,
        packed: PackedTensor,
        padding_idx: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
        rotation: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.shape
        if self.embedding_dim % packed.group_size:
            raise ValueError(
                f"embedding rows of {self.embedding_dim} need a group size dividing them, got {packed.group_size}"
            )
        self.bits, self.group_size = packed.bits, packed.group_size
        self.padding_idx = padding_idx
        self.compute_dtype = compute_dtype
        self.output_scale = 1.0  # Gemma scales embeddings by sqrt(hidden size)
        _register_packed(self, "", packed)
        self._set_rotation(rotation, self.embedding_dim)

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype, device=None) -> QuantEmbedding:
        packed = _empty_packed(tuple(layout["shape"]), layout["bits"], layout["group_size"], device)
        return cls(packed, layout.get("padding_idx"), dtype, rotation_of(layout))

    @property
    def packed_numel(self) -> int:
        """Weight entries held packed (buffers, not parameters)."""
        return self.num_embeddings * self.embedding_dim

    def weight_values(self) -> torch.Tensor:
        return dequantize(_packed(self, "", (self.num_embeddings, self.embedding_dim)), self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        values = self.unrotate_rows(dequantized_rows(self, (self.num_embeddings, self.embedding_dim), ids))
        return values if self.output_scale == 1.0 else values * self.output_scale

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x @ table^T for inputs already rotated (:meth:`rotate_input`): a tied head's logits."""
        return packed_product(self, x, (self.num_embeddings, self.embedding_dim))

    def layout(self) -> dict:
        return {"kind": "embedding", "shape": [self.num_embeddings, self.embedding_dim], "bits": self.bits,
                "group_size": self.group_size, "padding_idx": self.padding_idx,
                "output_scale": self.output_scale, **self._rotation_layout()}  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group_size}{self._rotation_repr()}"


class TiedQuantHead(nn.Module):
    """The LM head of a model with tied embeddings: logits against the packed embedding, stored once."""

    def __init__(self, embedding: QuantEmbedding | TieredQuantEmbedding, embedding_name: str):
        super().__init__()
        self._embedding = (embedding,)  # a reference, not a submodule: its buffers are saved under its own name
        self.embedding_name = embedding_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self._embedding[0]
        return table.head_logits(table.rotate_input(x))

    def layout(self) -> dict:
        return {"kind": "tied_head", "embedding": self.embedding_name}

    def extra_repr(self) -> str:
        return f"tied to {self.embedding_name}"


class QuantMPOLinear(nn.Module):
    """An MPO layer whose cores are stored packed; forward dequantizes the cores and contracts as planned."""

    def __init__(self, sites: Sites, bond_dims, cores: list[PackedTensor], bias: torch.Tensor | None,
                 source_kind: str = "linear", compute_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        self.sites = tuple((int(a), int(b)) for a, b in sites)
        self.bond_dims = tuple(int(r) for r in bond_dims)
        self.out_features = math.prod(a for a, _ in self.sites)
        self.in_features = math.prod(b for _, b in self.sites)
        self.bits, self.group_size = cores[0].bits, cores[0].group_size
        self.source_kind = source_kind
        self.compute_dtype = compute_dtype
        self.core_shapes = [c.shape for c in cores]
        for i, packed in enumerate(cores):
            _register_packed(self, f"core{i}_", packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.plan = plan_contraction(self.sites, self.bond_dims)

    @classmethod
    def from_layer(cls, layer: nn.Module, cores: list[PackedTensor]) -> QuantMPOLinear:
        """The packed counterpart of the ``MPOLinear`` ``layer``, holding its cores as ``cores``."""
        return cls(layer.sites, layer.bond_dims, cores, layer.bias, layer.source_kind, layer.cores[0].dtype)

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype, device=None) -> QuantMPOLinear:
        ranks = (1, *layout["bond_dims"], 1)
        shapes = [(ranks[i], m, n, ranks[i + 1]) for i, (m, n) in enumerate(layout["sites"])]
        cores = [_empty_packed(s, layout["bits"], layout["group_size"], device) for s in shapes]
        bias = torch.zeros(layout["shape"][0], dtype=dtype, device=device) if layout["bias"] else None
        return cls(layout["sites"], layout["bond_dims"], cores, bias, layout.get("source_kind", "linear"), dtype)

    @property
    def packed_numel(self) -> int:
        """Core entries held packed (buffers, not parameters)."""
        return sum(math.prod(s) for s in self.core_shapes)

    def core_values(self) -> list[torch.Tensor]:
        return [dequantize(_packed(self, f"core{i}_", s), self.compute_dtype) for i, s in enumerate(self.core_shapes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cores = [c.to(x.dtype) for c in self.core_values()]
        y = contract(x, cores, self.sites, self.plan)  # (..., out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def to_dense(self) -> torch.Tensor:
        return cores_to_dense(self.core_values())

    def layout(self) -> dict:
        return {"kind": "mpo", "shape": [self.out_features, self.in_features], "sites": [list(s) for s in self.sites],
                "bond_dims": list(self.bond_dims), "bits": self.bits, "group_size": self.group_size,
                "bias": self.bias is not None, "source_kind": self.source_kind}  # fmt: skip

    def extra_repr(self) -> str:
        return (f"out_features={self.out_features}, in_features={self.in_features}, sites={list(self.sites)}, "
                f"bond_dims={list(self.bond_dims)}, bits={self.bits}, group={self.group_size}")  # fmt: skip


class PackedRows(nn.Module):
    """One tier of a :class:`TieredQuantEmbedding`: some of its rows, packed at one width (buffers ``codes``,
    ``scale``, ``offset``, as a :class:`QuantLinear`'s weight, so the CPU kernels and scale training take it alike)."""

    def __init__(self, packed: PackedTensor, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.shape = tuple(packed.shape)
        self.bits, self.group_size = packed.bits, packed.group_size
        self.compute_dtype = compute_dtype
        _register_packed(self, "", packed)

    @property
    def packed_numel(self) -> int:
        return math.prod(self.shape)

    def weight_values(self) -> torch.Tensor:
        return dequantize(_packed(self, "", self.shape), self.compute_dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return dequantized_rows(self, self.shape, index)

    def extra_repr(self) -> str:
        return f"rows={self.shape[0]}, bits={self.bits}, group={self.group_size}"


class TieredQuantEmbedding(_RotatedRows, nn.Module):
    """Token embedding whose rows are packed at several widths (:mod:`bondcut.quant.tiers`: the rows in use finest).
    ``row_tier`` (uint8, one per row) says which tier holds each row; a tier holds its rows in increasing row order.
    Lookups and a tied head's logits compute what a :class:`QuantEmbedding` with the same rounded rows would."""

    def __init__(
        self,
        tiers: list[PackedTensor],
        row_tier: torch.Tensor,
        padding_idx: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
        rotation: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = row_tier.numel(), tiers[0].shape[1]
        if sum(p.shape[0] for p in tiers) != self.num_embeddings:
            raise ValueError(f"tiers hold {sum(p.shape[0] for p in tiers)} rows, row_tier names {self.num_embeddings}")
        self.padding_idx = padding_idx
        self.compute_dtype = compute_dtype
        self.output_scale = 1.0
        self.parts = nn.ModuleList(PackedRows(p, compute_dtype) for p in tiers)
        self.register_buffer("row_tier", row_tier.to(torch.uint8))
        self._index_memo = VersionMemo()
        self._set_rotation(rotation, self.embedding_dim)

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype, device=None) -> TieredQuantEmbedding:
        rows, width = layout["shape"]
        tiers = [_empty_packed((n, width), bits, group, device) for bits, n, group in layout["tiers"]]
        row_tier = torch.zeros(rows, dtype=torch.uint8, device=device)
        return cls(tiers, row_tier, layout.get("padding_idx"), dtype, rotation_of(layout))

    def _index(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(rows of each tier, each row's position within its tier), rebuilt when ``row_tier`` changes (loading)."""

        def build():
            tier = self.row_tier.long()
            rows = [(tier == t).nonzero().squeeze(1) for t in range(len(self.parts))]
            position = torch.empty_like(tier)
            for r in rows:
                position[r] = torch.arange(len(r), device=tier.device)
            return rows, position

        return self._index_memo.get((self.row_tier,), build)

    def weight_values(self) -> torch.Tensor:
        """The whole table as stored (rows W R^T when rotated), differentiable in trained scales."""
        rows, _ = self._index()
        table = torch.zeros(self.num_embeddings, self.embedding_dim, dtype=self.compute_dtype,
                            device=self.row_tier.device)  # fmt: skip
        for r, part in zip(rows, self.parts):
            table = table.index_copy(0, r, part.weight_values())
        return table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, position = self._index()
        tier, where = self.row_tier[ids], position[ids]
        values = torch.zeros(*ids.shape, self.embedding_dim, dtype=self.compute_dtype, device=ids.device)
        for t, part in enumerate(self.parts):
            mask = tier == t
            if mask.any():
                values = values.index_put((mask,), part.rows(where[mask]))
        values = self.unrotate_rows(values)
        return values if self.output_scale == 1.0 else values * self.output_scale

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x @ table^T for inputs already rotated: tier by tier (each through the CPU kernel where one fits) when
        no gradient is wanted, else through the whole dequantized table."""
        if torch.is_grad_enabled():
            return F.linear(x, self.weight_values().to(x.dtype))
        rows, _ = self._index()
        logits = x.new_empty(*x.shape[:-1], self.num_embeddings)
        for r, part in zip(rows, self.parts):
            logits.index_copy_(-1, r, packed_product(part, x, part.shape))
        return logits

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(p.bits for p in self.parts)

    def layout(self) -> dict:
        tiers = [[p.bits, p.shape[0], p.group_size] for p in self.parts]
        return {"kind": "tiered_embedding", "shape": [self.num_embeddings, self.embedding_dim], "tiers": tiers,
                "padding_idx": self.padding_idx, "output_scale": self.output_scale,
                **self._rotation_layout()}  # fmt: skip

    def extra_repr(self) -> str:
        widths = ", ".join(f"{p.shape[0]} rows int{p.bits}" for p in self.parts)
        return f"{self.num_embeddings}, {self.embedding_dim}, {widths}{self._rotation_repr()}"


QUANT_LAYERS = {"linear": QuantLinear, "embedding": QuantEmbedding, "mpo": QuantMPOLinear,
                "tiered_embedding": TieredQuantEmbedding}  # fmt: skip
EMBEDDING_KINDS = ("embedding", "tiered_embedding")
PACKED_LAYERS = (QuantLinear, QuantEmbedding, QuantMPOLinear, PackedRows)  # modules holding packed tensors themselves
