"""Two-site spectra: one SVD gives a 2-site MPO at every bond dimension, and its error curve.

A 2-site layout (m1 x n1)(m2 x n2) has a single bond, so its TT-SVD is one truncated SVD of the rearranged
(m1*n1) x (m2*n2) matrix: the MPO at bond chi is the first chi singular triplets, and its squared error is
the tail of the squared singular values. Plain low rank is the layout (m x 1)(1 x n); a balanced 2-site MPO is
a sum of chi Kronecker products. With input statistics C the matrix is whitened first (W L, C = L L^T; see
:mod:`bondcut.mpo.whiten`) and the cores are un-whitened once, at full rank: truncation commutes with it.

The allocator (:mod:`bondcut.allocate`) uses this to price every (layout, chi) of every matrix from one SVD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .decompose import MPO, cores_to_dense, decompose
from .sites import Sites, resolve_sites
from .whiten import input_factors, kron_in_order, unwhiten_cores


@dataclass
class TwoSiteSpectrum:
    """Full-rank 2-site cores of a (whitened) matrix and their singular values, sliced to any chi.

    Attributes:
        layout: the two sites ((m1, n1), (m2, n2)).
        left: (1, m1, n1, k) first core, un-whitened, in the weight's dtype.
        right: (k, m2, n2, 1) second core with the singular values folded in, un-whitened.
        singular_values: (k,) fp64, descending, of the whitened rearranged matrix.
        exact: True when the whitened error is the output error itself (no statistics, or the whole input on
            one site); False for a split input, whose whitening used Kronecker-factored statistics.
    """

    layout: Sites
    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor
    exact: bool

    @property
    def max_chi(self) -> int:
        return int(self.singular_values.numel())

    def params(self, chi: int) -> int:
        """Core entries of the MPO at bond ``chi``: chi * (m1*n1 + m2*n2)."""
        (m1, n1), (m2, n2) = self.layout
        return min(chi, self.max_chi) * (m1 * n1 + m2 * n2)

    @property
    def norm_sq(self) -> float:
        """Squared Frobenius norm of the whitened matrix (||W L||_F^2, or ||W||_F^2 without statistics)."""
        return float((self.singular_values**2).sum())

    def error_sq(self, chi: int) -> float:
        """Squared whitened error at bond ``chi``: the discarded tail sum_{i >= chi} s_i^2."""
        return float((self.singular_values[chi:] ** 2).sum())

    def mpo(self, chi: int) -> MPO:
        """The MPO at bond ``chi`` (clipped to full rank): slices of the full-rank cores."""
        chi = max(1, min(chi, self.max_chi))
        cores = [self.left[..., :chi].contiguous(), self.right[:chi].contiguous()]
        return MPO(cores=cores, discarded=[self.singular_values[chi:]])

    def dense(self, chi: int) -> torch.Tensor:
        """The (m x n) matrix the MPO at bond ``chi`` represents."""
        return cores_to_dense(self.mpo(chi).cores)


def two_site_spectrum(
    weight: torch.Tensor,
    sites: int | str | Sequence[Sequence[int]] = "lowrank",
    cov: torch.Tensor | None = None,
    damping: float = 1e-2,
) -> TwoSiteSpectrum:
    """Full-rank SVD of ``weight`` (m x n) in a 2-site layout, activation-aware when ``cov`` (n x n) is given."""
    m, n = weight.shape
    layout = resolve_sites(m, n, sites)
    if len(layout) != 2:
        raise ValueError(f"a spectrum needs a 2-site layout (e.g. 'lowrank' or 2), got {len(layout)} sites {layout}")
    if cov is not None and cov.shape != (n, n):
        raise ValueError(f"cov must be {n}x{n} (the input dimension of a {m}x{n} weight), got {tuple(cov.shape)}")
    w64 = weight.detach().double()
    factors = {} if cov is None else input_factors(cov, layout, damping)
    if factors:
        w64 = w64 @ kron_in_order(factors, layout)  # (m, n) whitened: W L
    full = decompose(w64, sites=layout, chi=None)  # full rank: nothing discarded
    left, right = full.cores  # (1, m1, n1, k), (k, m2, n2, 1) with the singular values in ``right``
    singular_values = torch.linalg.norm(right.reshape(right.shape[0], -1), dim=1)  # rows of S V^T: norms = s
    left, right = unwhiten_cores([left, right], factors, weight.dtype)
    in_sites = [i for i, (_, ni) in enumerate(layout) if ni > 1]
    return TwoSiteSpectrum(layout, left, right, singular_values, exact=not factors or len(in_sites) <= 1)
