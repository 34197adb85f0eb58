"""Test helper shared by the MPO property tests: a seeded random matrix of a site layout's shape."""

from __future__ import annotations

import math

import torch
from hypothesis import assume


def random_weight(sites, seed: int, max_entries: int) -> torch.Tensor:
    """A float64 Gaussian (m x n) matrix for ``sites`` [(m_1, n_1), ...]; hypothesis skips layouts with more than
    ``max_entries`` entries, to keep each example's SVDs in the millisecond range. Seeds torch's generator first, so
    later draws in the test are reproducible too."""
    m = math.prod(a for a, _ in sites)
    n = math.prod(b for _, b in sites)
    assume(m * n <= max_entries)
    torch.manual_seed(seed)
    return torch.randn(m, n, dtype=torch.float64)
