"""The MPO math: site layouts, TT-SVD, and planned contraction. Pure functions on tensors."""

from .contract import ContractionPlan, apply_steps, contract, plan_contraction, step_matrices
from .decompose import MPO, cores_to_dense, decompose, merge_cores
from .gauge import balance_bonds
from .sites import (
    SiteLayoutError,
    Sites,
    balanced_sites,
    bond_dims_for_chi,
    chi_for_fraction,
    lowrank_sites,
    max_bond_dims,
    mpo_num_params,
    resolve_sites,
)
from .spectrum import TwoSiteSpectrum, two_site_spectrum

__all__ = [
    "MPO",
    "ContractionPlan",
    "SiteLayoutError",
    "Sites",
    "apply_steps",
    "balance_bonds",
    "balanced_sites",
    "bond_dims_for_chi",
    "chi_for_fraction",
    "contract",
    "cores_to_dense",
    "decompose",
    "lowrank_sites",
    "max_bond_dims",
    "merge_cores",
    "mpo_num_params",
    "plan_contraction",
    "resolve_sites",
    "step_matrices",
    "two_site_spectrum",
    "TwoSiteSpectrum",
]
