"""Incoherence processing for packed weights (QuIP, Chee et al. 2023; QuaRot, Ashkboos et al. 2024).

For any orthogonal R, y = W x = (W R^T)(R x): a layer may store W R^T packed and rotate its input at run time.
Here R = blockdiag(H_b, ..., H_b) diag(s): random signs s on the inputs, then a normalized Sylvester-Hadamard
matrix H_b on each run of b consecutive inputs (b a power of two dividing the input width, at most
:data:`MAX_BLOCK`). R spreads an input column's outlier weights over b columns, so the group-wise grid of each
row fits its values better: on SmolLM2-135M (12 matrices of blocks 2, 15, 28; groups of 128; 8,192 calibration
tokens) GPTQ's relative output error fell from 0.0121 to 0.0057 (mean) at 3 bits and from 0.0022 to 0.0015 at
4 bits; blocks of 256 or 512 did no better than 64. The run-time cost is one (..., n/b, b) x (b, b) product per
input, b/out_features of the layer's own work (64/576 at most here).

The signs come from Python's :class:`random.Random` (its Mersenne Twister stream is fixed for a given seed), so
a layer stores only its block size and seed, not n signs.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import torch

MAX_BLOCK = 64
DEFAULT_SEED = 0


def rotation_block(width: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two <= ``max_block`` dividing ``width`` (1: this width is left unrotated)."""
    block = 1
    while block * 2 <= max_block and width % (block * 2) == 0:
        block *= 2
    return block


def rotation_signs(width: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """(width,) float32 of +-1, the same for the same (width, seed) on every machine."""
    bits = random.Random(seed).getrandbits(width)
    return torch.tensor([1.0 - 2.0 * ((bits >> i) & 1) for i in range(width)], dtype=torch.float32)


@lru_cache(maxsize=16)
def _hadamard(block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalized Sylvester-Hadamard matrix (block x block): symmetric and orthogonal, so its own inverse."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / math.sqrt(block)).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R x on the last dimension: x (..., n) -> (..., n). Also turns W into W R^T when applied to W's rows."""
    runs = (x * signs.to(x.dtype)).unflatten(-1, (-1, block))  # (..., n/b, b)
    return (runs @ _hadamard(block, x.dtype, x.device)).flatten(-2)


def unrotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R^T x on the last dimension (the inverse of :func:`rotate`): W R^T back to W, row by row."""
    runs = x.unflatten(-1, (-1, block)) @ _hadamard(block, x.dtype, x.device)
    return runs.flatten(-2) * signs.to(x.dtype)


def rotate_gram(gram: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R G R^T: the Gram matrix of the rotated inputs R x, given that of x (symmetric n x n)."""
    return rotate(rotate(gram, signs, block).T, signs, block).T
