"""TT-SVD against dense references: exactness, truncation error bookkeeping, optimality, tensorly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpo_helpers import random_weight

from bondcut.mpo import decompose, lowrank_sites

SMALL_DIMS = st.sampled_from([2, 3, 4, 6, 8, 9, 12, 16])


def _rel_err(w, what):
    return float(torch.linalg.norm(w - what) / torch.linalg.norm(w))


@pytest.mark.parametrize("sites", ["auto", 2, 3, 4, "lowrank", [(8, 3), (2, 8), (6, 4)]])
def test_full_chi_reconstructs_random_matrix(sites):
    torch.manual_seed(0)
    w = torch.randn(96, 96)
    mpo = decompose(w, sites=sites)
    assert _rel_err(w, mpo.to_dense()) < 1e-5
    assert mpo.truncation_error < 1e-3


def test_full_chi_reconstructs_trained_weights(trained_model):
    model, _ = trained_model
    for w in (model.model.layers[3].self_attn.q_proj.weight, model.model.layers[20].mlp.down_proj.weight):
        for sites in ("auto", 3):
            assert _rel_err(w.detach(), decompose(w.detach(), sites=sites).to_dense()) < 1e-5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(SMALL_DIMS, SMALL_DIMS), min_size=2, max_size=3), st.integers(1, 40), st.integers(0, 10**6))
def test_recorded_truncation_error_equals_frobenius_error(sites, chi, seed):
    w = random_weight(sites, seed, max_entries=40_000)
    mpo = decompose(w, sites=sites, chi=chi)
    actual = float(torch.linalg.norm(w - mpo.to_dense()))
    assert mpo.truncation_error == pytest.approx(actual, rel=1e-6, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(SMALL_DIMS, SMALL_DIMS), min_size=2, max_size=3), st.integers(0, 10**6))
def test_error_does_not_increase_with_chi(sites, seed):
    w = random_weight(sites, seed, max_entries=40_000)
    errors = [decompose(w, sites=sites, chi=chi).truncation_error for chi in (1, 2, 4, 8, 16, 32, 10**6)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-8


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(SMALL_DIMS, SMALL_DIMS), min_size=2, max_size=3), st.integers(1, 6), st.integers(0, 10**6))
def test_padding_bonds_keeps_the_operator(sites, extra, seed):
    mpo = decompose(random_weight(sites, seed, max_entries=40_000), sites=sites, chi=3)
    wider = [b + extra for b in mpo.bond_dims]
    padded = mpo.padded_to(wider)
    assert padded.bond_dims == tuple(wider) and padded.sites == mpo.sites
    torch.testing.assert_close(padded.to_dense(), mpo.to_dense())
    with pytest.raises(ValueError, match="widen"):
        mpo.padded_to([b - 1 for b in mpo.bond_dims])


def test_lowrank_layout_is_the_optimal_truncated_svd():
    torch.manual_seed(1)
    w = torch.randn(40, 30, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    mpo = decompose(w, sites="lowrank", chi=7)
    assert mpo.sites == lowrank_sites(40, 30) and mpo.bond_dims == (7,)
    assert mpo.truncation_error == pytest.approx(float(s[7:].norm()), rel=1e-9)


def test_kronecker_sum_is_exact_at_chi_two_where_svd_is_not():
    torch.manual_seed(2)
    a1, a2 = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    b1, b2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    w = torch.kron(a1, b1) + torch.kron(a2, b2)  # (40, 42)
    mpo = decompose(w, sites=[(8, 6), (5, 7)], chi=2)
    assert _rel_err(w, mpo.to_dense()) < 1e-10
    rank = mpo.num_params // (40 + 42)  # a truncated SVD with no more parameters
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    svd = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert _rel_err(w, svd) > 0.3


def test_tolerance_bounds_the_relative_error():
    torch.manual_seed(3)
    w = torch.randn(64, 64) @ torch.diag(torch.logspace(0, -3, 64))
    for tol in (0.3, 0.1, 0.01):
        mpo = decompose(w, sites=3, tol=tol)
        assert _rel_err(w, mpo.to_dense()) <= tol * 1.001
    assert decompose(w, sites=3, tol=0.01).num_params > decompose(w, sites=3, tol=0.3).num_params


def test_matches_tensorly_tt_matrix_at_the_same_ranks(trained_model):
    tensorly = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix

    model, _ = trained_model
    w = model.model.layers[10].mlp.up_proj.weight.detach().double()  # (1536, 576)
    ours = decompose(w, sites=3, chi=40)
    m_dims = [a for a, _ in ours.sites]
    n_dims = [b for _, b in ours.sites]
    tensorly.set_backend("numpy")
    tt = tensor_train_matrix(w.reshape(*m_dims, *n_dims).numpy(), rank=[1, *ours.bond_dims, 1])
    theirs = torch.from_numpy(tt.to_matrix())
    assert _rel_err(w, ours.to_dense()) <= 1.01 * _rel_err(w, theirs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D"):
        decompose(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="tol"):
        decompose(torch.randn(4, 4), tol=1.5)
    with pytest.raises(ValueError, match="chi"):
        decompose(torch.randn(4, 4), sites=2, chi=0)
    with pytest.raises(ValueError, match="bonds"):
        decompose(torch.randn(8, 8), sites=2, chi=[2, 2])
