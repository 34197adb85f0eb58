"""Site layouts: balanced factorization, fallbacks, bond caps and parameter budgets."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bondcut.mpo import (
    SiteLayoutError,
    balanced_sites,
    bond_dims_for_chi,
    chi_for_fraction,
    lowrank_sites,
    max_bond_dims,
    mpo_num_params,
    resolve_sites,
)
from bondcut.mpo.sites import balanced_factors, default_num_sites


def test_balanced_factors_of_model_dims():
    assert balanced_factors(576, 2) == (24, 24)
    assert balanced_factors(1536, 2) == (48, 32)
    assert balanced_factors(576, 3) == (9, 8, 8)


def test_balanced_sites_keeps_site_sizes_close():
    sites = balanced_sites(1536, 576, 2)
    assert sites == ((48, 24), (32, 24))
    assert max_bond_dims(sites) == (768,)


@given(st.integers(1, 2000), st.integers(1, 4))
def test_balanced_factors_multiply_back(n, k):
    factors = balanced_factors(n, k)
    assert len(factors) == k and math.prod(factors) == n and list(factors) == sorted(factors, reverse=True)


def test_prime_dims_raise_with_explicit_site_count():
    with pytest.raises(SiteLayoutError, match="cannot be split into 2 balanced sites"):
        balanced_sites(577, 577, 2)


def test_auto_falls_back_to_lowrank_for_prime_shapes():
    assert resolve_sites(577, 577, "auto") == lowrank_sites(577, 577)


def test_auto_picks_more_sites_for_big_matrices():
    assert default_num_sites(576, 576) == 2
    assert default_num_sites(4096, 11008) == 3
    assert len(resolve_sites(4096, 11008, "auto")) == 3


def test_explicit_sites_are_validated():
    assert resolve_sites(6, 10, [(2, 5), (3, 2)]) == ((2, 5), (3, 2))
    with pytest.raises(SiteLayoutError, match="do not factor"):
        resolve_sites(6, 10, [(2, 5), (2, 2)])
    with pytest.raises(SiteLayoutError, match="must be an int"):
        resolve_sites(6, 10, "balanced")


def test_bond_dims_are_capped_by_block_sizes():
    sites = ((4, 2), (3, 3), (2, 4))
    assert max_bond_dims(sites) == (8, 8)
    assert bond_dims_for_chi(sites, 5) == (5, 5)
    assert bond_dims_for_chi(sites, 100) == (8, 8)
    with pytest.raises(ValueError):
        bond_dims_for_chi(sites, 0)


@given(st.sampled_from([(576, 576), (192, 576), (1536, 576), (576, 1536)]), st.integers(1, 4), st.floats(0.01, 1.0))
def test_chi_for_fraction_is_the_largest_chi_within_budget(shape, k, fraction):
    m, n = shape
    sites = balanced_sites(m, n, k) if k > 1 else lowrank_sites(m, n)
    chi = chi_for_fraction(sites, fraction)
    params = mpo_num_params(sites, bond_dims_for_chi(sites, chi))
    assert chi == 1 or params <= fraction * m * n
    if chi < max(max_bond_dims(sites)):
        assert mpo_num_params(sites, bond_dims_for_chi(sites, chi + 1)) > fraction * m * n
