"""Activation-aware rounding (GPTQ, Frantar et al. 2022) into bondcut's packed group-wise format.

Round-to-nearest minimizes each weight's own error; what matters is the layer's output on real inputs,
||X (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X. GPTQ rounds the input columns one at a time and
moves each column's rounding error onto the columns not yet rounded, along H's inverse (through its Cholesky
factor), so later roundings absorb earlier ones. Each group of ``group_size`` input columns takes its fp16
scale and offset (with the same clip search as round-to-nearest) from the weights as they stand when the group
is reached. The result is an ordinary :class:`PackedTensor`: loading and the forward do not change.
"""

from __future__ import annotations

import torch

from .packing import PackedTensor, check_bits, codes_for, dequantize, fit_ranges, group_dividing, pack, quantize


def quantize_aware(
    weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int = 64, damping: float = 0.1
) -> PackedTensor:
    """Pack ``weight`` (out, in) so that its output on inputs with Gram matrix ``gram`` (in, in) changes least.

    ``damping`` adds that fraction of H's mean diagonal to its diagonal (GPTQ's dampening: a well-posed
    inverse when some input directions are rarely excited). Groups lie along rows; when ``group_size`` does not
    divide the row length, the largest even size below it that does is used.
    """
    check_bits(bits, group_size)
    out_features, in_features = weight.shape
    if gram.shape != (in_features, in_features):
        raise ValueError(f"gram must be ({in_features}, {in_features}) for a weight of {tuple(weight.shape)}, "
                         f"got {tuple(gram.shape)}")  # fmt: skip
    group = group_dividing(in_features, group_size, bits)
    w = weight.detach().double().clone()
    h = gram.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * torch.diagonal(h).mean() * torch.eye(in_features, dtype=h.dtype)
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        return quantize(weight, bits, group_size)  # not positive definite even damped: plain rounding
    codes = torch.empty(out_features, in_features, dtype=torch.uint8)
    scales, offsets = [], []
    for start in range(0, in_features, group):
        stop = start + group
        scale, offset = fit_ranges(w[:, start:stop].float(), bits)  # (out,) each
        scales.append(scale)
        offsets.append(offset)
        errors = torch.empty(out_features, group, dtype=w.dtype)
        for j in range(start, stop):
            q = codes_for(w[:, j].float(), scale, offset, bits)
            codes[:, j] = q.to(torch.uint8)
            rounded = (q * scale.float() + offset.float()).double()
            error = (w[:, j] - rounded) / upper[j, j]
            w[:, j + 1 : stop] -= error[:, None] * upper[j, j + 1 : stop][None, :]
            errors[:, j - start] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]  # the group's errors, onto every later column at once
    scale = torch.stack(scales, dim=1).reshape(-1)  # (out, groups) row-major: the packed layout's group order
    offset = torch.stack(offsets, dim=1).reshape(-1)
    return pack(codes, scale, offset, weight.shape, bits, group)


def is_low_rank_pair(sites, core_shapes) -> bool:
    """Whether MPO cores are a plain low-rank pair: sites (m x 1)(1 x n), W = A B with A (m x r), B (r x n)."""
    return len(sites) == 2 and sites[0][1] == 1 and sites[1][0] == 1 and len(core_shapes) == 2


def quantize_low_rank_aware(
    cores: list[torch.Tensor], gram: torch.Tensor, bits: int, group_size: int = 64, damping: float = 0.1
) -> list[PackedTensor]:
    """Pack a low-rank pair of MPO cores (1, m, 1, r), (r, 1, n, 1) so the layer's output on inputs with Gram
    matrix ``gram`` (n x n) changes least: GPTQ on B (its inputs are the layer's), then A refit by least squares
    to what the float pair gave on those inputs through the rounded B (A absorbs B's rounding error), then GPTQ
    on A with its own inputs' Gram matrix B_q H B_q^T.

    Groups stay runs of ``group_size`` consecutive entries of each flattened core (the packed format); a core
    whose rows are not a multiple of ``group_size`` is rounded to nearest (GPTQ's groups would straddle rows).
    """
    check_bits(bits, group_size)
    first, second = cores
    _, m, _, r = first.shape
    n = second.shape[2]
    a = first.detach().reshape(m, r).double()
    b = second.detach().reshape(r, n).double()
    h = gram.detach().double()

    def aware(weight: torch.Tensor, g: torch.Tensor, shape) -> PackedTensor:
        rows = weight.shape[1]
        packed = (quantize_aware(weight.float(), g, bits, group_size, damping) if rows % group_size == 0
                  else quantize(weight.float(), bits, group_size))  # fmt: skip
        return PackedTensor(packed.codes, packed.scale, packed.offset, tuple(shape), bits, packed.group_size)

    packed_b = aware(b, h, second.shape)
    b_q = dequantize(packed_b).reshape(r, n).double()
    h_a = b_q @ h @ b_q.T  # (r, r): Gram matrix of A's inputs B_q x
    ridge = 1e-6 * torch.diagonal(h_a).mean().clamp_min(1e-12) * torch.eye(r, dtype=h_a.dtype)
    refit = torch.linalg.solve(h_a + ridge, (a @ b @ h @ b_q.T).T).T  # argmin_A E||A B x - A' B_q x||^2
    packed_a = aware(refit, h_a, first.shape)
    return [packed_a, packed_b]
