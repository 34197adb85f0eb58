"""Gauge balancing: the operator never changes, every bond ends balanced, padded bonds survive, layers agree."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpo_helpers import random_weight

from bondcut.mpo import balance_bonds, cores_to_dense, decompose
from bondcut.mpo.gauge import bond_norms
from bondcut.mpo_linear import MPOLinear

SMALL_DIMS = st.sampled_from([1, 2, 3, 4, 6, 8])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(SMALL_DIMS, SMALL_DIMS), min_size=2, max_size=4), st.integers(1, 12), st.integers(0, 10**6))
def test_balancing_keeps_the_operator_and_balances_every_bond(sites, chi, seed):
    mpo = decompose(random_weight(sites, seed, max_entries=20_000), sites=sites, chi=chi)
    balanced = balance_bonds(mpo.cores)
    assert torch.allclose(cores_to_dense(balanced), mpo.to_dense(), atol=1e-10)
    for bond in range(len(balanced) - 1):
        left, right = bond_norms(balanced, bond)
        assert torch.allclose(left, right, rtol=1e-3)


def test_lowrank_balance_is_u_sqrt_s_and_sqrt_s_vt():
    torch.manual_seed(0)
    w = torch.randn(40, 30, dtype=torch.float64)
    mpo = decompose(w, sites="lowrank", chi=7)
    u, s, vh = torch.linalg.svd(w)
    left, right = balance_bonds(mpo.cores)
    # singular vectors are defined up to sign: compare column by column through absolute values
    assert torch.allclose(left.reshape(40, 7).abs(), (u[:, :7] * s[:7].sqrt()).abs(), atol=1e-10)
    assert torch.allclose(right.reshape(7, 30).abs(), (s[:7].sqrt()[:, None] * vh[:7]).abs(), atol=1e-10)


def test_zero_padded_bond_indices_stay_zero_and_finite():
    torch.manual_seed(1)
    mpo = decompose(torch.randn(12, 12, dtype=torch.float64), sites="lowrank", chi=3).padded_to([5])
    left, right = balance_bonds(mpo.cores)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert torch.allclose(cores_to_dense([left, right]), mpo.to_dense(), atol=1e-12)
    assert left[..., 3:].abs().max() == 0 and right[3:].abs().max() == 0


@pytest.mark.parametrize("sites", ["lowrank", 2, 3])
def test_layer_balance_gauge_keeps_its_output(sites):
    torch.manual_seed(2)
    layer = MPOLinear.from_mpo(decompose(torch.randn(48, 64), sites=sites, chi=6), bias=torch.randn(48))
    x = torch.randn(5, 64)
    before = layer(x).detach()
    left, right = bond_norms([c.detach() for c in layer.cores], len(layer.cores) - 2)  # the singular values' bond
    imbalance_before = float((right / left).max())
    layer.balance_gauge()
    assert torch.allclose(layer(x), before, atol=1e-5)
    assert imbalance_before > 2  # TT-SVD's canonical gauge is far from balanced ...
    for bond in range(len(layer.cores) - 1):  # ... and balance_gauge fixes it in the layer's own parameters
        left, right = bond_norms([c.detach() for c in layer.cores], bond)
        assert torch.allclose(left, right, rtol=1e-3)
