"""Two-site spectra: every chi from one SVD equals the direct (activation-aware) TT-SVD at that chi."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bondcut.mpo import decompose, two_site_spectrum
from bondcut.mpo.whiten import decompose_whitened, output_error


def _stats(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    x[: max(1, n // 4)] *= 10.0  # outlier channels
    return x @ x.T


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(12, 8), (16, 18), (9, 20)]), st.sampled_from(["lowrank", 2]), st.integers(1, 6),
       st.booleans(), st.integers(0, 10**6))  # fmt: skip
def test_every_chi_matches_the_direct_decomposition(shape, sites, chi, aware, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    cov = _stats(shape[1], seed) if aware else None
    spectrum = two_site_spectrum(w, sites, cov)
    direct = decompose_whitened(w, cov, sites=sites, chi=chi) if aware else decompose(w, sites=sites, chi=chi)
    assert torch.allclose(spectrum.dense(chi), direct.to_dense(), atol=1e-9 * float(w.abs().max()) * 100)
    assert spectrum.error_sq(chi) ** 0.5 == pytest.approx(direct.truncation_error, rel=1e-9, abs=1e-9)
    assert spectrum.params(chi) == spectrum.mpo(chi).num_params == direct.num_params
    assert spectrum.exact == (not aware or sites == "lowrank")


def test_lowrank_error_is_the_output_error_without_damping():
    w = torch.randn(10, 7, dtype=torch.float64)
    cov = _stats(7, 3)
    spectrum = two_site_spectrum(w, "lowrank", cov, damping=0.0)
    for chi in (1, 3, 6):
        assert spectrum.error_sq(chi) ** 0.5 == pytest.approx(output_error(w, spectrum.dense(chi), cov), rel=1e-8)
    assert spectrum.error_sq(0) == pytest.approx(spectrum.norm_sq) and spectrum.error_sq(7) == pytest.approx(
        0, abs=1e-12
    )


def test_more_than_two_sites_is_refused():
    with pytest.raises(ValueError, match="2-site layout"):
        two_site_spectrum(torch.randn(8, 8), 3)
