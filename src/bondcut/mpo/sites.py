"""Site layouts: how a weight matrix W (m x n) is split into MPO sites (m1*n1)...(mk*nk).

A layout is a tuple of ``(m_i, n_i)`` pairs with ``prod(m_i) == m`` and ``prod(n_i) == n``. Two special cases:
the balanced k-site layout (factors of m and of n as equal as possible) and plain low rank, the 2-site layout
``((m, 1), (1, n))`` whose single bond is the matrix rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

Sites = tuple[tuple[int, int], ...]


class SiteLayoutError(ValueError):
    """The requested site layout does not fit the matrix shape."""


@lru_cache(maxsize=4096)
def _factorizations(n: int, k: int, max_factor: int) -> tuple[tuple[int, ...], ...]:
    """All non-increasing k-tuples of positive ints with product n and first factor <= max_factor."""
    if k == 1:
        return ((n,),) if n <= max_factor else ()
    found = []
    for first in range(min(n, max_factor), 0, -1):
        if n % first == 0:
            found.extend((first, *rest) for rest in _factorizations(n // first, k - 1, first))
    return tuple(found)


def balanced_factors(n: int, k: int) -> tuple[int, ...]:
    """The k factors of n (descending, 1s allowed) with the smallest largest factor, ties by spread."""
    if n < 1 or k < 1:
        raise SiteLayoutError(f"cannot factor {n} into {k} factors: both must be positive")
    options = _factorizations(n, k, n)
    return min(options, key=lambda f: (f[0], f[0] / f[-1]))


def balanced_sites(m: int, n: int, k: int) -> Sites:
    """Balanced k-site layout for an (m x n) matrix.

    Factors of m go in descending and factors of n in ascending order, so site sizes m_i*n_i stay close and
    the middle bonds can carry large ranks. Raises :class:`SiteLayoutError` when m or n has fewer than k prime
    factors (a site would get a dimension of 1, e.g. prime m), rather than silently returning another layout.
    """
    if k < 1:
        raise SiteLayoutError(f"number of sites must be >= 1, got {k}")
    m_f = balanced_factors(m, k)
    n_f = tuple(reversed(balanced_factors(n, k)))
    sites = tuple(zip(m_f, n_f))
    if k > 1 and any(mi == 1 or ni == 1 for mi, ni in sites):
        raise SiteLayoutError(
            f"a {m}x{n} matrix cannot be split into {k} balanced sites (factors of {m}: {m_f}, of {n}: "
            f"{n_f}); use fewer sites, sites='lowrank', or give explicit sites such as [({m}, 1), (1, {n})]"
        )
    return sites


def lowrank_sites(m: int, n: int) -> Sites:
    """The 2-site layout (m x 1)(1 x n): an MPO with this layout is a rank-chi factorization."""
    return ((m, 1), (1, n))


def default_num_sites(m: int, n: int) -> int:
    """Site count by size: 2 below 2^24 entries (e.g. 2048x4096), 3 from 2^24 (4096x4096) to 2^30, then more (<= 5)."""
    return max(2, min(5, int(math.log2(m * n)) // 6 - 1))


def resolve_sites(m: int, n: int, sites: int | str | Sequence[Sequence[int]] | None) -> Sites:
    """Turn a user's ``sites`` (None/"auto", an int, "lowrank", or explicit pairs) into a validated layout.

    ``None``/"auto" tries :func:`default_num_sites` and falls back to fewer sites, then to low rank, when the
    shape does not factor (documented fallback, never a silent wrong shape). An explicit int is strict.
    """
    if sites is None or sites == "auto":
        for k in range(default_num_sites(m, n), 1, -1):
            try:
                return balanced_sites(m, n, k)
            except SiteLayoutError:
                continue
        return lowrank_sites(m, n)
    if sites == "lowrank":
        return lowrank_sites(m, n)
    if isinstance(sites, str):
        raise SiteLayoutError(f"sites must be an int, 'auto', 'lowrank' or a list of (m_i, n_i) pairs, got {sites!r}")
    if isinstance(sites, int):
        return balanced_sites(m, n, sites)
    layout = tuple((int(a), int(b)) for a, b in sites)
    if math.prod(a for a, _ in layout) != m or math.prod(b for _, b in layout) != n:
        raise SiteLayoutError(
            f"sites {list(layout)} do not factor a {m}x{n} matrix: products are "
            f"{math.prod(a for a, _ in layout)}x{math.prod(b for _, b in layout)}"
        )
    return layout


def max_bond_dims(sites: Sites) -> tuple[int, ...]:
    """Largest useful bond dimension at each of the k-1 bonds: min(left block size, right block size)."""
    sizes = [mi * ni for mi, ni in sites]
    return tuple(min(math.prod(sizes[: i + 1]), math.prod(sizes[i + 1 :])) for i in range(len(sites) - 1))


def bond_dims_for_chi(sites: Sites, chi: int | Sequence[int]) -> tuple[int, ...]:
    """Bond dimensions for a max bond ``chi`` (one int or one per bond), capped by :func:`max_bond_dims`."""
    caps = max_bond_dims(sites)
    chis = (chi,) * len(caps) if isinstance(chi, int) else tuple(chi)
    if len(chis) != len(caps):
        raise ValueError(f"chi has {len(chis)} entries but the layout has {len(caps)} bonds")
    if any(c < 1 for c in chis):
        raise ValueError(f"chi must be >= 1, got {chis}")
    return tuple(min(c, cap) for c, cap in zip(chis, caps))


def mpo_num_params(sites: Sites, bond_dims: Sequence[int]) -> int:
    """Number of core entries: sum_i r_{i-1} * m_i * n_i * r_i with r_0 = r_k = 1."""
    ranks = (1, *bond_dims, 1)
    return sum(ranks[i] * mi * ni * ranks[i + 1] for i, (mi, ni) in enumerate(sites))


def chi_for_fraction(sites: Sites, fraction: float) -> int:
    """Largest uniform chi whose MPO has at most ``fraction`` of the dense matrix's entries (at least 1)."""
    m = math.prod(a for a, _ in sites)
    n = math.prod(b for _, b in sites)
    budget = fraction * m * n
    lo, hi = 1, max(max_bond_dims(sites), default=1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mpo_num_params(sites, bond_dims_for_chi(sites, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
