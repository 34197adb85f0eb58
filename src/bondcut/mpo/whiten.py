"""Activation-aware MPO decomposition: make the *output* error ||(W - W_hat) X||_F small, not the weight error.

With C = X X^T (input second moments from calibration text, n x n) and C = L L^T (Cholesky, damped),
||(W - W_hat) X||_F^2 = tr((W - W_hat) C (W - W_hat)^T) = ||(W - W_hat) L||_F^2. So we decompose the whitened
matrix W L by TT-SVD and un-whiten: W_hat = MPO(W L) L^{-1}, with L^{-1} absorbed into the cores that hold the
input index, keeping W_hat an MPO of the same sites and bonds.

- If the input index sits on one site (low rank (m x 1)(1 x n), or (m1 x 1)(m2 x n), ...), L^{-1} goes into that
  core exactly and the result is the optimum for that layout's TT-SVD; for 2 sites it is the closed-form
  optimum of the weighted rank-r problem (the SVD-LLM solution).
- If the input index is split over several sites, a dense L^{-1} would break the MPO, so C is replaced by its
  nearest Kronecker product C_1 x ... x C_k (per-site marginals, K-FAC style) and each core absorbs its own
  L_i^{-1}. The output error is then still measured exactly against the true C.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .decompose import MPO, decompose
from .sites import Sites, resolve_sites


def cholesky_factor(cov: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
    """Lower-triangular L with L L^T = cov + damping * mean(diag(cov)) * I (damping keeps it invertible)."""
    cov = cov.double()
    n = cov.shape[0]
    scale = float(torch.diagonal(cov).mean()) or 1.0
    eye = torch.eye(n, dtype=cov.dtype, device=cov.device)
    jitter = damping
    for _ in range(8):  # raise the damping until the factorization succeeds (ill-conditioned statistics)
        factor, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        if int(info) == 0:
            return factor
        jitter = max(jitter * 10, 1e-8)
    raise ValueError(f"input covariance is not positive definite even with damping {jitter:g}; check the statistics")


def kronecker_marginals(cov: torch.Tensor, dims: Sequence[int]) -> list[torch.Tensor]:
    """Per-factor second moments C_i (d_i x d_i) of C over the index split n = d_1...d_k (partial traces).

    For C = A_1 x ... x A_k each C_i is A_i up to a positive scale, which whitening does not care about.
    """
    k = len(dims)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = letters[:k]
    view = cov.reshape(*dims, *dims)
    out = []
    for i in range(k):
        cols = rows[:i] + letters[k] + rows[i + 1 :]  # trace every other factor: same letter for row and column
        out.append(torch.einsum(f"{rows}{cols}->{rows[i]}{letters[k]}", view))
    return out


def output_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """sqrt(tr((W - W_hat) C (W - W_hat)^T)) = ||(W - W_hat) X||_F for C = X X^T."""
    diff = weight.double() - approx.double()
    return float(torch.sqrt(torch.clamp(torch.einsum("ij,jk,ik->", diff, cov.double(), diff), min=0.0)))


def decompose_whitened(
    weight: torch.Tensor,
    cov: torch.Tensor,
    sites: int | str | Sequence[Sequence[int]] | None = None,
    chi: int | Sequence[int] | None = None,
    tol: float | None = None,
    damping: float = 1e-2,
) -> MPO:
    """Activation-aware TT-SVD of ``weight`` (m x n) given the input second moments ``cov`` (n x n).

    Same sites/chi/tol vocabulary as :func:`bondcut.mpo.decompose`; ``tol`` then bounds the relative
    *whitened* error. Returns cores in the weight's dtype; ``truncation_error`` is the whitened error
    ||(W - W_hat) L||_F (exactly the output error when the input sits on one site; with a split input it is
    measured against the Kronecker-factored C, use :func:`output_error` for the true one).
    """
    m, n = weight.shape
    if cov.shape != (n, n):
        raise ValueError(f"cov must be {n}x{n} (the input dimension of a {m}x{n} weight), got {tuple(cov.shape)}")
    layout: Sites = resolve_sites(m, n, sites)
    factors = input_factors(cov, layout, damping)
    whitened = weight.detach().double() @ kron_in_order(factors, layout)  # W L, L = kron of per-site factors
    mpo = decompose(whitened, sites=layout, chi=chi, tol=tol)
    cores = unwhiten_cores(mpo.cores, factors, weight.dtype)
    return MPO(cores=cores, discarded=mpo.discarded)  # truncation_error: the whitened error ||(W - W_hat) L||_F


def input_factors(cov: torch.Tensor, layout: Sites, damping: float = 1e-2) -> dict[int, torch.Tensor]:
    """Per-site lower Cholesky factors of the input statistics: {site: L_i} (fp64).

    One exact factor of ``cov`` when the input index sits on one site (the last site if none has inputs > 1),
    else one factor per input site from the Kronecker-factored marginals (:func:`kronecker_marginals`).
    """
    in_sites = [i for i, (_, ni) in enumerate(layout) if ni > 1]
    if len(in_sites) <= 1:
        return {in_sites[0] if in_sites else len(layout) - 1: cholesky_factor(cov, damping)}
    dims = [layout[i][1] for i in in_sites]
    return {i: cholesky_factor(c, damping) for i, c in zip(in_sites, kronecker_marginals(cov.double(), dims))}


def unwhiten_cores(cores: Sequence[torch.Tensor], factors: dict[int, torch.Tensor], dtype: torch.dtype) -> list:
    """Absorb L_i^{-1} into the input index of each whitened core (r, m_i, n_i, r'), returning ``dtype`` cores."""
    out = []
    for i, core in enumerate(cores):
        core = core.double()
        if i in factors:
            eye = torch.eye(factors[i].shape[0], dtype=torch.float64, device=core.device)
            inverse = torch.linalg.solve_triangular(factors[i], eye, upper=False)  # L_i^{-1}
            core = torch.einsum("amnb,nk->amkb", core, inverse)
        out.append(core.to(dtype))
    return out


def kron_in_order(factors: dict[int, torch.Tensor], layout: Sites) -> torch.Tensor:
    """Kronecker product of the per-site input factors in site order (identity where a site has none)."""
    out = torch.ones(1, 1, dtype=torch.float64)
    for i, (_, ni) in enumerate(layout):
        f = factors.get(i, torch.eye(ni, dtype=torch.float64))
        out = torch.kron(out, f)
    return out
