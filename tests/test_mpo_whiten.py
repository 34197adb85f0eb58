"""Activation-aware MPO: exact output-error algebra, the closed-form weighted low-rank optimum, and wins over plain TT-SVD."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bondcut.mpo import decompose
from bondcut.mpo.whiten import cholesky_factor, decompose_whitened, kronecker_marginals, output_error


def _correlated_inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    """Inputs with a few strong directions and outlier channels, like transformer activations. (n, tokens)"""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    x[: max(1, n // 8)] *= 20.0  # outlier channels
    return x


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 12), st.integers(3, 12), st.integers(1, 3), st.integers(0, 10**6))
def test_lowrank_matches_the_closed_form_weighted_optimum(m, n, rank, seed):
    torch.manual_seed(seed)
    w = torch.randn(m, n, dtype=torch.float64)
    x = _correlated_inputs(n, 4 * n, seed)
    cov = x @ x.T
    mpo = decompose_whitened(w, cov, sites="lowrank", chi=rank, damping=0.0)
    w_hat = mpo.to_dense()
    # optimum of min_{rank r} ||(W - W_hat) X||_F: the tail singular values of W L (Eckart-Young on W L)
    s = torch.linalg.svdvals(w @ cholesky_factor(cov, damping=0.0))
    optimum = float(torch.sqrt((s[rank:] ** 2).sum()))
    assert output_error(w, w_hat, cov) == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    assert mpo.truncation_error == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    plain = decompose(w, sites="lowrank", chi=rank).to_dense()
    rounding = 1e-10 * float(torch.linalg.norm(w)) * float(torch.trace(cov)) ** 0.5  # full rank: both ~0
    assert output_error(w, w_hat, cov) <= output_error(w, plain, cov) * (1 + 1e-9) + rounding


def test_lowrank_beats_random_rank_r_candidates_brute_force():
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=torch.float64)
    cov = (lambda x: x @ x.T)(_correlated_inputs(4, 16, 1))
    best = output_error(w, decompose_whitened(w, cov, sites="lowrank", chi=1, damping=0.0).to_dense(), cov)
    for _ in range(2000):  # no rank-1 matrix does better (local search around random starts)
        a, b = torch.randn(5, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
        b = torch.linalg.lstsq(a, w).solution  # best b for this a in plain norm, then compare in output norm
        assert output_error(w, a @ b, cov) >= best - 1e-9


def test_split_input_layouts_stay_mpos_and_win_on_output_error():
    torch.manual_seed(3)
    w = torch.randn(48, 36, dtype=torch.float64)
    cov = (lambda x: x @ x.T)(_correlated_inputs(36, 200, 4))
    for sites in (((6, 6), (8, 6)), ((4, 3), (4, 3), (3, 4))):
        aware = decompose_whitened(w, cov, sites=sites, chi=4)
        plain = decompose(w, sites=sites, chi=4)
        assert aware.sites == plain.sites and aware.bond_dims == plain.bond_dims  # same size
        assert output_error(w, aware.to_dense(), cov) < output_error(w, plain.to_dense(), cov)


def test_full_chi_is_exact_and_kronecker_marginals_recover_factors():
    torch.manual_seed(5)
    w = torch.randn(12, 8, dtype=torch.float64)
    cov = (lambda x: x @ x.T)(_correlated_inputs(8, 40, 6))
    torch.testing.assert_close(decompose_whitened(w, cov, sites=((3, 2), (4, 4)), chi=10**6).to_dense(), w)
    a = (lambda x: x @ x.T)(torch.randn(2, 5, dtype=torch.float64))
    b = (lambda x: x @ x.T)(torch.randn(4, 9, dtype=torch.float64))
    ma, mb = kronecker_marginals(torch.kron(a, b), (2, 4))
    torch.testing.assert_close(ma / ma[0, 0], a / a[0, 0])
    torch.testing.assert_close(mb / mb[0, 0], b / b[0, 0])


def test_bad_covariance_is_a_clear_error():
    with pytest.raises(ValueError, match="cov must be 4x4"):
        decompose_whitened(torch.randn(3, 4), torch.eye(3), sites="lowrank", chi=1)
    singular = torch.zeros(4, 4)
    factor = cholesky_factor(singular)  # all-zero statistics: damping falls back to the identity scale
    assert torch.isfinite(factor).all()
