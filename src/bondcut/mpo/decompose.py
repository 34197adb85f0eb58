"""TT-SVD of a weight matrix into a Matrix Product Operator (Oseledets 2011, "Tensor-Train Decomposition").

W (m x n) is reshaped to a k-way tensor whose i-th index is the site pair (m_i, n_i), then split from the
left by sequential truncated SVDs. Every left core is an isometry, so the squared Frobenius error of the
result is exactly the sum of the squared singular values discarded at each bond; they are recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sites import Sites, resolve_sites


@dataclass
class MPO:
    """An MPO: cores of shape (r_{i-1}, m_i, n_i, r_i) with r_0 = r_k = 1, and what truncation dropped."""

    cores: list[torch.Tensor]
    discarded: list[torch.Tensor]  # singular values dropped at each of the k-1 bonds

    @property
    def sites(self) -> Sites:
        return tuple((int(c.shape[1]), int(c.shape[2])) for c in self.cores)

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(s[0] for s in self.sites), math.prod(s[1] for s in self.sites)

    @property
    def bond_dims(self) -> tuple[int, ...]:
        return tuple(int(c.shape[3]) for c in self.cores[:-1])

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    @property
    def truncation_error(self) -> float:
        """Absolute Frobenius error ||W - W_hat||_F, from the discarded singular values alone."""
        return math.sqrt(sum(float((s.double() ** 2).sum()) for s in self.discarded))

    def to_dense(self) -> torch.Tensor:
        """Multiply the cores back out to the (m x n) matrix (tests and export only)."""
        return cores_to_dense(self.cores)

    def padded_to(self, bond_dims: Sequence[int]) -> MPO:
        """The same operator with each bond widened to ``bond_dims`` by zero slices, so it fits a layer of that
        shape (a rank-deficient matrix's TT-SVD can come out with smaller bonds than asked for)."""
        if len(bond_dims) != len(self.bond_dims) or any(b < a for a, b in zip(self.bond_dims, bond_dims)):
            raise ValueError(f"can only widen bonds {list(self.bond_dims)} to as many at least as wide, "
                             f"got {list(bond_dims)}")  # fmt: skip
        bonds = [1, *bond_dims, 1]
        cores = []
        for i, core in enumerate(self.cores):
            wide = core.new_zeros(bonds[i], core.shape[1], core.shape[2], bonds[i + 1])
            wide[: core.shape[0], :, :, : core.shape[3]] = core
            cores.append(wide)
        return MPO(cores=cores, discarded=list(self.discarded))

    def __repr__(self) -> str:
        m, n = self.shape
        return (
            f"MPO(shape={m}x{n}, sites={list(self.sites)}, bond_dims={list(self.bond_dims)}, params={self.num_params})"
        )


def merge_cores(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract a run of adjacent cores into one core (r_first, prod m_i, prod n_i, r_last): exact, fewer sites."""
    if not cores:
        raise ValueError("an MPO needs at least one core")
    acc = cores[0]  # (r0, M, N, r) with M, N the merged row/col indices so far
    for core in cores[1:]:
        r0, m_acc, n_acc, _ = acc.shape
        _, mi, ni, r1 = core.shape
        acc = torch.einsum("amnr,rijb->aminjb", acc, core)  # (r0, M, m_i, N, n_i, r')
        acc = acc.reshape(r0, m_acc * mi, n_acc * ni, r1)
    return acc


def cores_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores (r, m_i, n_i, r') into the dense (prod m_i x prod n_i) matrix."""
    return merge_cores(cores)[0, :, :, 0]


def _keep_rank(s: torch.Tensor, chi: int | None, max_discard_sq: float | None) -> int:
    """Number of singular values to keep: at most chi, and few enough that the dropped energy <= budget."""
    keep = s.numel() if chi is None else min(chi, s.numel())
    if max_discard_sq is not None:
        tail = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])  # tail[j] = sum_{i>=j} s_i^2
        fits = torch.nonzero(tail <= max_discard_sq)
        keep = min(keep, int(fits[0]) if fits.numel() else s.numel())
    return max(keep, 1)


def decompose(
    weight: torch.Tensor,
    sites: int | str | Sequence[Sequence[int]] | None = None,
    chi: int | Sequence[int] | None = None,
    tol: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> MPO:
    """Split ``weight`` (m x n) into an MPO by TT-SVD.

    Args:
        weight: 2-D tensor, m rows (outputs) by n columns (inputs), as ``nn.Linear.weight``.
        sites: layout (see :func:`bondcut.mpo.sites.resolve_sites`): None/"auto", number of sites, "lowrank",
            or explicit ``[(m_1, n_1), ..., (m_k, n_k)]``.
        chi: max bond dimension, one int or one per bond. None keeps every bond at full rank.
        tol: relative Frobenius error target ||W - W_hat|| / ||W||, spread evenly over the k-1 bonds.
        compute_dtype: precision of the SVDs. float64 (default) makes full-chi round trips exact to float32
            rounding for ~1.6x the time of float32; cores come back in ``weight``'s dtype.
    """
    if weight.ndim != 2:
        raise ValueError(f"decompose expects a 2-D weight matrix, got shape {tuple(weight.shape)}")
    if tol is not None and not 0 <= tol < 1:
        raise ValueError(f"tol is a relative error and must be in [0, 1), got {tol}")
    m, n = weight.shape
    layout = resolve_sites(m, n, sites)
    k = len(layout)
    chis = [chi] * (k - 1) if chi is None or isinstance(chi, int) else list(chi)
    if len(chis) != k - 1:
        raise ValueError(f"chi has {len(chis)} entries but the {k}-site layout has {k - 1} bonds")
    if any(c is not None and c < 1 for c in chis):
        raise ValueError(f"chi must be >= 1, got {chi}")

    w = weight.detach().to(compute_dtype)
    m_dims = [a for a, _ in layout]
    n_dims = [b for _, b in layout]
    # (m_1..m_k, n_1..n_k) -> (m_1, n_1, m_2, n_2, ...) -> site-major matrix chain
    interleave = [p for i in range(k) for p in (i, k + i)]
    rest = w.reshape(*m_dims, *n_dims).permute(*interleave).contiguous()
    max_discard_sq = None if tol is None else (tol * float(torch.linalg.norm(w))) ** 2 / max(k - 1, 1)

    cores: list[torch.Tensor] = []
    discarded: list[torch.Tensor] = []
    rank = 1
    for i in range(k - 1):
        mi, ni = layout[i]
        mat = rest.reshape(rank * mi * ni, -1)  # (r_{i-1} m_i n_i, remaining sites)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        keep = _keep_rank(s, chis[i], max_discard_sq)
        discarded.append(s[keep:])  # kept in compute precision so truncation_error stays exact
        cores.append(u[:, :keep].reshape(rank, mi, ni, keep).to(weight.dtype))
        rest = s[:keep, None] * vh[:keep]  # (r_i, remaining sites)
        rank = keep
    mk, nk = layout[-1]
    cores.append(rest.reshape(rank, mk, nk, 1).to(weight.dtype))
    return MPO(cores=cores, discarded=discarded)
