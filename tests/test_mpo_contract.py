"""Planned contraction and MPOLinear: equal to x @ W^T + b, cheapest order, never builds W in forward."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpo_helpers import random_weight
from torch.utils._python_dispatch import TorchDispatchMode

from bondcut.mpo import balanced_sites, decompose, lowrank_sites, plan_contraction
from bondcut.mpo_linear import MPOLinear

DIMS = st.sampled_from([1, 2, 3, 4, 5, 6, 8])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(DIMS, DIMS), min_size=1, max_size=4),
    st.integers(1, 12),
    st.lists(st.integers(1, 4), min_size=0, max_size=2),
    st.booleans(),
    st.integers(0, 10**6),
)
def test_forward_equals_dense_reference(sites, chi, lead, bias, seed):
    w = random_weight(sites, seed, max_entries=50_000)
    m, n = w.shape
    b = torch.randn(m, dtype=torch.float64) if bias else None
    layer = MPOLinear.from_mpo(decompose(w, sites=sites, chi=chi), bias=b)
    x = torch.randn(*lead, n, dtype=torch.float64)
    w_hat = layer.to_dense()
    expected = x @ w_hat.T + (0 if b is None else b)
    assert layer(x).shape == (*lead, m)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)


def _all_orders_cost(sites, bond_dims):
    """Brute force: the cheapest cost over every order that grows one contiguous run of cores."""
    k = len(sites)
    best = math.inf
    for start in range(k):
        for sides in itertools.product("LR", repeat=k - 1):
            a = b = start
            order = [start]
            ok = True
            for side in sides:
                if side == "L":
                    a -= 1
                    order.append(a)
                else:
                    b += 1
                    order.append(b)
                ok = ok and 0 <= a and b < k
            if ok:
                best = min(best, _order_cost(sites, bond_dims, order))
    return best


def _order_cost(sites, bond_dims, order):
    """FLOPs of absorbing cores in ``order``, counted independently from the planner's own bookkeeping."""
    ranks = (1, *bond_dims, 1)
    absorbed: set[int] = set()
    total = 0
    for i in order:
        a, b = (min(absorbed | {i}), max(absorbed | {i}))
        outside_n = math.prod(sites[j][1] for j in range(len(sites)) if j not in absorbed and j != i)
        inside_m = math.prod(sites[j][0] for j in range(a, b + 1))
        # labels touched: the free n's, n_i, both outer bonds of the new run, m's of the new run, and the
        # bond shared with the old run (if any)
        shared = 1
        if absorbed:
            shared = ranks[i + 1] if i < min(absorbed) else ranks[i]
        total += 2 * outside_n * sites[i][1] * ranks[a] * inside_m * ranks[b + 1] * shared
        absorbed.add(i)
    return total


@pytest.mark.parametrize(
    "sites,bond_dims",
    [
        (((48, 24), (32, 24)), (230,)),
        (((16, 8), (12, 8), (8, 9)), (66, 66)),
        (((8, 4), (8, 4), (6, 6), (4, 6)), (32, 233, 24)),
        (((2, 16), (16, 2), (16, 16), (2, 2)), (5, 40, 3)),
        (((1536, 1), (1, 576)), (209,)),
    ],
)
def test_plan_is_the_cheapest_order(sites, bond_dims):
    plan = plan_contraction(sites, bond_dims)
    assert plan.flops_per_token == _order_cost(sites, bond_dims, plan.order)
    assert plan.flops_per_token == _all_orders_cost(sites, bond_dims)


def test_lowrank_plan_costs_two_r_m_plus_n():
    plan = plan_contraction(lowrank_sites(1536, 576), (209,))
    assert plan.order == (1, 0)
    assert plan.flops_per_token == 2 * 209 * (1536 + 576)


def test_small_chi_kronecker_layout_is_cheaper_than_dense():
    sites = balanced_sites(4096, 4096, 3)
    assert plan_contraction(sites, (8, 8)).flops_per_token < 2 * 4096 * 4096


class _RecordOutputSizes(TorchDispatchMode):
    """Records the storage size (in elements) of every tensor any aten op produces: views add nothing new."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.sizes.extend(t.untyped_storage().nbytes() // t.element_size() for t in tensors)
        return out


@pytest.mark.parametrize("sites", [3, 2, "lowrank"])
def test_forward_never_builds_the_dense_matrix(monkeypatch, sites):
    torch.manual_seed(0)
    layer = MPOLinear.from_mpo(decompose(torch.randn(96, 64), sites=sites, chi=6), bias=torch.randn(96))
    x = torch.randn(1, 64)
    expected = x @ layer.to_dense().T + layer.bias

    def forbidden(*args, **kwargs):
        raise AssertionError("forward built the dense matrix")

    monkeypatch.setattr("bondcut.mpo_linear.cores_to_dense", forbidden)
    monkeypatch.setattr("bondcut.mpo_linear.merge_cores", forbidden)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # training path: never merges
    with torch.no_grad():
        layer(x)  # the first inference call lays the cores out for the plan, once
        with _RecordOutputSizes() as recorder:
            y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert recorder.sizes and max(recorder.sizes) < 96 * 64 // 4  # every intermediate is far smaller than W


def test_layer_reports_params_flops_and_layout():
    layer = MPOLinear(((48, 24), (32, 24)), (10,), bias=True)
    assert layer.num_params == 48 * 24 * 10 + 10 * 32 * 24 + 1536
    assert layer.flops_per_token == layer.plan.flops_per_token > 0
    assert layer.layout() == {
        "shape": [1536, 576],
        "sites": [[48, 24], [32, 24]],
        "bond_dims": [10],
        "bias": True,
        "source_kind": "linear",
    }


def test_dtype_and_device_follow_the_cores():
    layer = MPOLinear.from_mpo(decompose(torch.randn(12, 8), sites=2, chi=3)).to(torch.bfloat16)
    assert layer(torch.randn(4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_wrong_input_width_is_a_clear_error():
    layer = MPOLinear(((4, 2), (3, 3)), (2,), bias=False)
    with pytest.raises(ValueError, match="expected in_features=6"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="bond dims"):
        MPOLinear(((4, 2), (3, 3)), (2, 2))


def test_gradients_flow_to_the_cores():
    layer = MPOLinear.from_mpo(decompose(torch.randn(12, 8), sites=2, chi=3), bias=torch.zeros(12))
    layer(torch.randn(5, 8)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("sites", [3, 4])
def test_merged_inference_is_exact_and_training_uses_the_cores(sites):
    torch.manual_seed(1)
    layer = MPOLinear.from_mpo(decompose(torch.randn(96, 64, dtype=torch.float64), sites=sites, chi=5),
                               bias=torch.randn(96, dtype=torch.float64))  # fmt: skip
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    expected = x @ layer.to_dense().T + layer.bias
    k = len(layer.sites)
    for merge in [(k,), (1, k - 1), (k - 1, 1), (1,) * k]:
        layer.set_merge(merge)
        assert len(layer.merged_layout()[0]) == len(merge)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    layer.set_merge((k,))
    layer(x).sum().backward()  # grad enabled and cores trainable: the cores themselves get gradients
    assert all(c.grad is not None for c in layer.cores)
    with pytest.raises(ValueError, match="merge must split"):
        layer.set_merge((k + 1,))


def test_inference_cache_follows_core_updates_and_saves_contiguous():
    torch.manual_seed(2)
    layer = MPOLinear.from_mpo(decompose(torch.randn(24, 36), sites=((4, 6), (6, 6)), chi=4))
    x = torch.randn(5, 36)
    with torch.no_grad():
        layer(x)
        layer.cores[0].mul_(2.0)  # e.g. an optimizer step: the cached step matrices must not go stale
        torch.testing.assert_close(layer(x), x @ layer.to_dense().T)
    layer.set_merge((2,))
    with torch.no_grad():
        before = layer(x)
        layer.cores[1].mul_(0.5)
        torch.testing.assert_close(layer(x), before * 0.5)
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(value.contiguous(), dict(layer.named_parameters())[name].detach())
