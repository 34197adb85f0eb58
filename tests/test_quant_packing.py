"""Group-wise packed quantization math: error bounds, packing round trips, storage size, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bondcut.quant.packing import (
    dequantize,
    group_dividing,
    pack_codes,
    quantize,
    storage_shapes,
    unpack_codes,
)

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=4).filter(lambda s: math.prod(s) <= 4000)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from([8, 4]), group=st.sampled_from([2, 8, 32, 64]), seed=st.integers(0, 999))
def test_dequantized_error_is_at_most_half_a_step_plus_clipping(shape, bits, group, seed):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    packed = quantize(weight, bits, group)
    restored = dequantize(packed)
    assert restored.shape == weight.shape
    flat = torch.nn.functional.pad(weight.reshape(-1), (0, -weight.numel() % group)).view(-1, group)
    span = (flat.amax(1) - flat.amin(1)) / ((1 << bits) - 1)  # step of the unclipped range, per group
    error = torch.nn.functional.pad((restored - weight).reshape(-1).abs(), (0, -weight.numel() % group)).view(-1, group)
    # a clipped range is never worse in squared error than the full one, whose entries are within half a step
    full_bound = span / 2 + 1e-3 * flat.abs().amax(1) + 1e-6  # fp16 scale/offset rounding allowance
    assert ((error**2).sum(1) <= group * full_bound**2 * 1.0001).all()


@given(codes=st.lists(st.integers(0, 15), min_size=2, max_size=200).filter(lambda c: len(c) % 2 == 0))
def test_int4_codes_pack_two_per_byte_and_unpack_exactly(codes):
    tensor = torch.tensor(codes, dtype=torch.uint8)
    stored = pack_codes(tensor, 4)
    assert stored.numel() == len(codes) // 2
    assert torch.equal(unpack_codes(stored, 4), tensor)


def test_storage_is_bits_per_weight_plus_two_halves_per_group():
    weight = torch.randn(576, 1536)
    for bits in (8, 4):
        packed = quantize(weight, bits, 64)
        assert packed.codes.dtype == torch.uint8 and packed.scale.dtype == torch.float16
        assert packed.nbytes == weight.numel() * bits // 8 + weight.numel() // 64 * 4
        assert (packed.codes.numel(), packed.scale.numel()) == storage_shapes(weight.shape, bits, 64)


def test_constant_groups_are_exact():
    weight = torch.full((4, 64), 0.25)
    assert torch.equal(dequantize(quantize(weight, 4, 64)), weight)


def test_int8_is_far_closer_than_int4_on_trained_weights(trained_model):
    model, _ = trained_model
    weight = model.model.layers[5].mlp.down_proj.weight
    errors = {b: (dequantize(quantize(weight, b)) - weight).norm() / weight.norm() for b in (8, 4)}
    assert errors[8] < 0.01 < errors[4] < 0.2
    assert errors[4] / errors[8] > 8  # ~16x finer steps


def test_bad_bits_and_groups_are_refused_with_an_example():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize(torch.ones(4), 3)
    with pytest.raises(ValueError, match="even number"):
        quantize(torch.ones(4), 4, group_size=7)
    with pytest.raises(ValueError, match="even number >= 2, got 0"):  # per row is a model-level choice only
        quantize(torch.ones(4), 4, group_size=0)


def test_group_dividing_picks_the_largest_even_divisor():
    assert group_dividing(576, 64) == 64
    assert group_dividing(640, 128) == 128
    assert group_dividing(90, 64) == 30
    with pytest.raises(ValueError):
        group_dividing(7, 64)
