"""MPOLinear: the drop-in replacement for ``nn.Linear`` whose weight is an MPO.

The forward contracts the input with the cores in the order chosen by
:func:`bondcut.mpo.plan_contraction` (fewest FLOPs for this layer's sites and bonds); the dense weight is
never built there. ``to_dense`` exists for tests and export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .mpo import MPO, Sites, contract, cores_to_dense, plan_contraction


class MPOLinear(nn.Module):
    """y = x W^T + b with W (out_features x in_features) held as MPO cores (r_{i-1}, m_i, n_i, r_i)."""

    def __init__(
        self,
        sites: Sequence[Sequence[int]],
        bond_dims: Sequence[int],
        bias: bool = True,
        source_kind: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if source_kind not in ("linear", "conv1d"):
            raise ValueError(f"source_kind must be 'linear' or 'conv1d', got {source_kind!r}")
        self.source_kind = source_kind  # what export_dense rebuilds: nn.Linear or transformers Conv1D
        self.sites: Sites = tuple((int(a), int(b)) for a, b in sites)
        self.bond_dims = tuple(int(r) for r in bond_dims)
        if len(self.bond_dims) != len(self.sites) - 1:
            raise ValueError(f"{len(self.sites)} sites need {len(self.sites) - 1} bond dims, got {self.bond_dims}")
        self.out_features = math.prod(a for a, _ in self.sites)
        self.in_features = math.prod(b for _, b in self.sites)
        ranks = (1, *self.bond_dims, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[i], mi, ni, ranks[i + 1], device=device, dtype=dtype))
            for i, (mi, ni) in enumerate(self.sites)
        )
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)) if bias else None
        self.plan = plan_contraction(self.sites, self.bond_dims)

    @classmethod
    def from_mpo(cls, mpo: MPO, bias: torch.Tensor | None = None, source_kind: str = "linear") -> MPOLinear:
        """Wrap decomposed cores (and an optional bias) as a layer on the cores' device and dtype."""
        first = mpo.cores[0]
        layer = cls(
            mpo.sites, mpo.bond_dims, bias=bias is not None, source_kind=source_kind, device=first.device, dtype=first.dtype
        )
        with torch.no_grad():
            for param, core in zip(layer.cores, mpo.cores):
                param.copy_(core)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = contract(x, list(self.cores), self.sites, self.plan)  # (..., out_features)
        return y if self.bias is None else y + self.bias

    @property
    def num_params(self) -> int:
        """Core entries plus bias."""
        return sum(p.numel() for p in self.parameters())

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds x2 of the planned contraction for one input row (bias excluded)."""
        return self.plan.flops_per_token

    def to_dense(self) -> torch.Tensor:
        """The (out_features x in_features) weight the cores represent."""
        return cores_to_dense(list(self.cores))

    def layout(self) -> dict:
        """JSON-ready description used in config.json to rebuild this layer before weights load."""
        return {
            "shape": [self.out_features, self.in_features],
            "sites": [list(s) for s in self.sites],
            "bond_dims": list(self.bond_dims),
            "bias": self.bias is not None,
            "source_kind": self.source_kind,
        }

    def extra_repr(self) -> str:
        return (
            f"out_features={self.out_features}, in_features={self.in_features}, sites={list(self.sites)}, "
            f"bond_dims={list(self.bond_dims)}, bias={self.bias is not None}, contraction_order={self.plan.order}"
        )
