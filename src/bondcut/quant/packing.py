"""Group-wise weight-only quantization to 8, 4, 3 or 2 bits, stored packed: pure functions on tensors.

A tensor is flattened in row-major order and cut into groups of ``group_size`` consecutive entries (the
last group zero-padded). Each group keeps an fp16 ``scale`` and ``offset`` (its minimum), and every entry an
unsigned code ``q`` in [0, 2^bits - 1] with ``w ≈ offset + q * scale`` (asymmetric round-to-nearest, the
llama.cpp Q4_1 / Q8_1 recipe). Codes are packed densely, little-end first: two per byte at 4 bits, four at 2,
eight per three bytes at 3; so a weight costs ``bits + 32 / group_size`` bits: 4.5 (int4) or 8.5 (int8) at the
default group of 64. A group must fill whole bytes (a multiple of 2, 4 and 8 entries at 4, 2 and 3 bits).

When a tensor's last dimension is a multiple of ``group_size``, groups never straddle rows, so single
rows can be dequantized alone (embedding lookups do that). ``group_size=0`` (:data:`PER_ROW`) asks for one group
per row of a weight matrix (:func:`row_group`): int8 that way runs through PyTorch's int8 CPU kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BITS = (8, 4, 3, 2)
PER_ROW = 0  # group_size meaning "one group per row of the matrix"
DEFAULT_GROUP = 64  # what tensors without rows of their own (MPO cores) use when PER_ROW is asked


@dataclass
class PackedTensor:
    """A quantized tensor: ``codes`` (uint8, packed two per byte at 4 bits), fp16 ``scale``/``offset`` per group."""

    codes: torch.Tensor  # (numel_padded * bits / 8,) uint8
    scale: torch.Tensor  # (groups,) float16
    offset: torch.Tensor  # (groups,) float16
    shape: tuple[int, ...]
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset))


def group_multiple(bits: int) -> int:
    """Entries a group's size must be a multiple of, so that the group fills whole bytes (and an even number)."""
    return max(2, 8 // math.gcd(bits, 8))


def check_bits(bits: int, group_size: int, per_row_allowed: bool = False) -> None:
    """Raise a clear error for an unsupported bit width or group size. :data:`PER_ROW` is a choice of the whole
    model's configuration (resolved per matrix by :func:`row_group`), not a size a tensor can be cut by."""
    if bits not in BITS:
        widths = ", ".join(map(str, BITS))
        raise ValueError(f"bits must be one of {widths}, got {bits!r}; example: bondcut quantize DIR --bits 4")
    if per_row_allowed and group_size == PER_ROW:
        return
    multiple = group_multiple(bits)
    if group_size < multiple or group_size % multiple:
        per_row = ", or 0 for one group per row" if per_row_allowed else ""
        raise ValueError(f"group_size must be a multiple of {multiple} (>= {multiple}) at {bits} bits{per_row}, got "
                         f"{group_size!r}; example: --group-size 64")  # fmt: skip


def row_group(group_size: int, row_length: int) -> int:
    """The group size for a matrix with rows of ``row_length``: the row itself under :data:`PER_ROW`."""
    return row_length if group_size == PER_ROW else group_size


def group_dividing(length: int, group_size: int, bits: int = 8) -> int:
    """The largest group size <= ``group_size`` that divides ``length`` (rows then dequantize alone) and fills whole
    bytes at ``bits`` (:func:`group_multiple`)."""
    multiple = group_multiple(bits)
    for size in range(min(group_size, length), 1, -1):
        if length % size == 0 and size % multiple == 0:
            return size
    raise ValueError(f"no group size <= {group_size} that is a multiple of {multiple} divides a row of {length} "
                     f"entries (at {bits} bits)")  # fmt: skip


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 codes (a whole number of bytes' worth) -> storage bytes, low bits first: unchanged at 8 bits,
    ``8 // bits`` per byte at 4 and 2, eight codes per three bytes (one 24-bit word) at 3."""
    if bits == 8:
        return codes
    if bits == 3:
        words = codes.view(-1, 8).to(torch.int32) << torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)
        word = words.sum(dim=1, dtype=torch.int32)  # (numel/8,): disjoint bit fields, so the sum is an OR
        return torch.stack([(word >> shift) & 0xFF for shift in (0, 8, 16)], dim=1).flatten().to(torch.uint8)
    per_byte = 8 // bits
    fields = codes.view(-1, per_byte) << torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return fields.sum(dim=1, dtype=torch.uint8)


def unpack_codes(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` on the last dimension: storage bytes (..., B) -> codes (..., B * 8 / bits)."""
    if bits == 8:
        return stored
    mask = (1 << bits) - 1
    if bits == 3:
        triples = stored.view(*stored.shape[:-1], -1, 3).to(torch.int32)  # (..., words, 3)
        word = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=stored.device)
        return ((word.unsqueeze(-1) >> shifts) & mask).to(torch.uint8).flatten(-2)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=stored.device)
    return ((stored.unsqueeze(-1) >> shifts) & mask).flatten(-2)


CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _round(groups: torch.Tensor, low: torch.Tensor, high: torch.Tensor, levels: int):
    """Codes, fp16 scale/offset and squared error per group for the range [low, high] of each group."""
    scale = ((high - low) / levels).half()
    offset = low.half()
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(low))
    codes = torch.round((groups - offset.float()[:, None]) / safe[:, None]).clamp_(0, levels)
    error = ((codes * scale.float()[:, None] + offset.float()[:, None] - groups) ** 2).sum(dim=1)
    return codes.to(torch.uint8), scale, offset, error


def fit_ranges(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, offset) per row of ``groups`` (G, g): among its min/max shrunk by :data:`CLIP_SHRINKS`, the
    range with the least squared rounding error (clipping a few outliers buys finer steps for the rest: the
    llama.cpp / AWQ clip search)."""
    levels = (1 << bits) - 1
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    _, scale, offset, error = _round(groups, low, high, levels)
    for shrink in CLIP_SHRINKS[1:]:
        _, s, o, e = _round(groups, low * shrink, high * shrink, levels)
        better = e < error
        scale[better], offset[better], error[better] = s[better], o[better], e[better]
    return scale, offset


def codes_for(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes of ``values`` on the grid ``offset + q * scale`` (shapes broadcast), as float."""
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    return torch.round((values - offset.float()) / safe).clamp_(0, (1 << bits) - 1)


def pack(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, shape, bits: int, group_size: int):
    """A :class:`PackedTensor` from codes in row-major order (any shape; padded to whole groups here)."""
    flat = codes.reshape(-1).to(torch.uint8)
    padded = math.ceil(flat.numel() / group_size) * group_size
    flat = torch.nn.functional.pad(flat, (0, padded - flat.numel()))
    return PackedTensor(pack_codes(flat, bits), scale, offset, tuple(shape), bits, group_size)


def weight_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight`` in float32, row-major, zero-padded to whole groups: (groups, group_size)."""
    flat = weight.detach().reshape(-1).float()
    padded = math.ceil(flat.numel() / group_size) * group_size
    return torch.nn.functional.pad(flat, (0, padded - flat.numel())).view(-1, group_size)


def quantize(weight: torch.Tensor, bits: int, group_size: int = 64) -> PackedTensor:
    """Round ``weight`` group-wise to ``bits``-bit codes on each group's best clipped range (:func:`fit_ranges`);
    computed in float32, stored packed."""
    check_bits(bits, group_size)
    groups = weight_groups(weight, group_size)  # (G, g)
    scale, offset = fit_ranges(groups, bits)
    codes = codes_for(groups, scale[:, None], offset[:, None], bits)
    return pack(codes, scale, offset, weight.shape, bits, group_size)  # codes already fill whole groups


def dequantize_groups(
    stored: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Codes of whole groups (any leading shape) -> values of shape (..., groups * group_size)."""
    codes = unpack_codes(stored, bits)  # (..., G * g)
    lead = codes.shape[:-1]
    grouped = codes.view(*lead, -1, group_size).to(dtype)  # (..., G, g)
    values = grouped * scale.to(dtype).unsqueeze(-1) + offset.to(dtype).unsqueeze(-1)
    return values.view(*lead, -1)


def dequantize(packed: PackedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor a :class:`PackedTensor` stands for, in its original shape."""
    values = dequantize_groups(packed.codes, packed.scale, packed.offset, packed.bits, packed.group_size, dtype)
    return values[: math.prod(packed.shape)].view(packed.shape)


def storage_shapes(shape: tuple[int, ...], bits: int, group_size: int) -> tuple[int, int]:
    """(bytes of codes, number of groups) of a packed tensor of ``shape``: to allocate before loading."""
    groups = math.ceil(math.prod(shape) / group_size)
    return groups * group_size * bits // 8, groups
