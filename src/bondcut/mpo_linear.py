"""MPOLinear: the drop-in replacement for ``nn.Linear`` whose weight is an MPO.

The forward contracts the input with the cores in the order chosen by
:func:`bondcut.mpo.plan_contraction` (fewest FLOPs for this layer's sites and bonds); the dense weight is
never built there. ``to_dense`` exists for tests and export.

Execution without gradients (inference) may instead run on *merged* cores: adjacent cores contracted into
fewer, larger ones (``merge`` gives the group sizes; one group is the dense weight). That is exact, costs
memory, and can be faster; :mod:`bondcut.tune` picks it per layer by measured latency. Training always runs
on the cores themselves, so gradients and optimizer state stay MPO-sized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .mpo import (
    MPO,
    Sites,
    apply_steps,
    balance_bonds,
    contract,
    cores_to_dense,
    merge_cores,
    plan_contraction,
    step_matrices,
)


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
        replaced_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if source_kind not in ("linear", "conv1d"):
            raise ValueError(f"source_kind must be 'linear' or 'conv1d', got {source_kind!r}")
        self.source_kind = source_kind  # what export_dense rebuilds: nn.Linear or transformers Conv1D
        self.sites: Sites = tuple((int(a), int(b)) for a, b in sites)
        # (out, in) of the matrix this layer replaced, where neuron selection narrowed it (bondcut.neurons)
        self.replaced_shape = None if replaced_shape is None else tuple(int(d) for d in replaced_shape)
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
        self.merge: tuple[int, ...] = (1,) * len(self.sites)  # group sizes of merged cores used for inference
        self._inference: tuple | None = None  # (key, step matrices, plan) cached for gradient-free forwards
        self.cache_inference = True  # False where the cores are re-gathered each forward (FSDP)

    @classmethod
    def from_mpo(cls, mpo: MPO, bias: torch.Tensor | None = None, source_kind: str = "linear") -> MPOLinear:
        """Wrap decomposed cores (and an optional bias) as a layer on the cores' device and dtype."""
        first = mpo.cores[0]
        layer = cls(
            mpo.sites,
            mpo.bond_dims,
            bias=bias is not None,
            source_kind=source_kind,
            device=first.device,
            dtype=first.dtype,
        )
        with torch.no_grad():
            for param, core in zip(layer.cores, mpo.cores):
                param.copy_(core)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cache_inference or (torch.is_grad_enabled() and any(c.requires_grad for c in self.cores)):
            y = contract(x, list(self.cores), self.sites, self.plan)  # (..., out_features), differentiable
        else:
            matrices, plan = self._inference_matrices()
            y = apply_steps(x, matrices, plan, self.in_features, self.out_features)
        return y if self.bias is None else y + self.bias

    def balance_gauge(self) -> None:
        """Regauge the cores in place so every bond index weighs the same on both sides (same operator; see
        :mod:`bondcut.mpo.gauge`)."""
        with torch.no_grad():
            for param, core in zip(self.cores, balance_bonds(list(self.cores))):
                param.copy_(core)

    def set_merge(self, merge: Sequence[int]) -> None:
        """Run inference on cores merged in consecutive groups of these sizes, e.g. (2, 1); (k,) is dense."""
        merge = tuple(int(g) for g in merge)
        if sum(merge) != len(self.sites) or min(merge) < 1:
            raise ValueError(f"merge must split {len(self.sites)} cores into groups of >= 1, got {merge}")
        self.merge = merge
        self._inference = None

    def merged_layout(self, merge: Sequence[int] | None = None) -> tuple[Sites, tuple[int, ...]]:
        """Sites and bond dims after merging the cores in groups of ``merge`` (default: the current merge)."""
        merge = self.merge if merge is None else tuple(merge)
        sites, bonds, start = [], [], 0
        for size in merge:
            group = self.sites[start : start + size]
            sites.append((math.prod(a for a, _ in group), math.prod(b for _, b in group)))
            start += size
            if start < len(self.sites):
                bonds.append(self.bond_dims[start - 1])
        return tuple(sites), tuple(bonds)

    def _inference_matrices(self) -> tuple[list[torch.Tensor], object]:
        """The step matrices for gradient-free forwards, rebuilt only when the cores changed."""
        key = self._cache_key()
        if self._inference is not None and self._inference[0] == key:
            return self._inference[1], self._inference[2]
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable later under autograd
            if self.merge == (1,) * len(self.sites):
                self._lay_out_cores_for_plan()
                key = self._cache_key()  # the lay-out moved the cores
                cores, plan = list(self.cores), self.plan
            else:
                groups, start = [], 0
                for size in self.merge:
                    groups.append(merge_cores(list(self.cores[start : start + size])))
                    start += size
                cores, plan = groups, plan_contraction(*self.merged_layout())
            matrices = [m.detach() for m in step_matrices(cores, plan)]
        self._inference = (key, matrices, plan)
        return matrices, plan

    def _cache_key(self) -> tuple:
        """Changes whenever the cached step matrices would: another merge, in-place updates, new storage."""
        return self.merge, tuple((c._version, c.data_ptr(), c.dtype, c.device) for c in self.cores)

    def _lay_out_cores_for_plan(self) -> None:
        """Store each core so that its step matrix is a view: no per-forward copy and no second copy kept."""
        for st in self.plan.steps:
            core = self.cores[st.core]
            if not core.permute(st.core_perm).is_contiguous():
                inverse = tuple(sorted(range(4), key=lambda d: st.core_perm[d]))
                core.data = core.data.permute(st.core_perm).contiguous().permute(inverse)

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
        layout = {
            "shape": [self.out_features, self.in_features],
            "sites": [list(s) for s in self.sites],
            "bond_dims": list(self.bond_dims),
            "bias": self.bias is not None,
            "source_kind": self.source_kind,
        }
        if self.narrowed:
            layout["replaced_shape"] = list(self.replaced_shape)
        return layout

    @property
    def narrowed(self) -> bool:
        """Whether this layer is narrower than the matrix it replaced (an MLP neuron selection)."""
        return self.replaced_shape is not None and self.replaced_shape != (self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"out_features={self.out_features}, in_features={self.in_features}, sites={list(self.sites)}, "
            f"bond_dims={list(self.bond_dims)}, bias={self.bias is not None}, contraction_order={self.plan.order}"
            + ("" if self.merge == (1,) * len(self.sites) else f", inference_merge={list(self.merge)}")
        )
