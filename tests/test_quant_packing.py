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
    group_multiple,
    pack_codes,
    quantize,
    storage_shapes,
    unpack_codes,
)

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=4).filter(lambda s: math.prod(s) <= 4000)


@settings(max_examples=80, deadline=None)
@given(
    shape=shapes, bits=st.sampled_from([8, 4, 3, 2]), group=st.sampled_from([2, 8, 32, 64]), seed=st.integers(0, 999)
)
def test_dequantized_error_is_at_most_half_a_step_plus_clipping(shape, bits, group, seed):
    group = max(group, group_multiple(bits))
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


@given(bits=st.sampled_from([8, 4, 3, 2]), data=st.data())
def test_codes_pack_densely_and_unpack_exactly(bits, data):
    per_unit = 8 // math.gcd(bits, 8)  # codes filling a whole number of bytes: 1, 2, 8, 4
    units = data.draw(st.integers(1, 25))
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=units * per_unit, max_size=units * per_unit))
    tensor = torch.tensor(codes, dtype=torch.uint8)
    stored = pack_codes(tensor, bits)
    assert stored.dtype == torch.uint8 and stored.numel() == len(codes) * bits // 8
    assert torch.equal(unpack_codes(stored, bits), tensor)
    rows = stored.view(units, -1)  # rows of whole bytes unpack alone (embedding lookups rely on it)
    assert torch.equal(unpack_codes(rows, bits), tensor.view(units, -1))


def test_codes_are_laid_out_low_bits_first():
    codes = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0x0F]
    assert pack_codes(torch.tensor([1, 2, 3, 0, 7, 0, 0, 0], dtype=torch.uint8), 3).tolist() == [0xD1, 0x70, 0x00]


def test_storage_is_bits_per_weight_plus_two_halves_per_group():
    weight = torch.randn(576, 1536)
    for bits in (8, 4, 3, 2):
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
    errors = {b: (dequantize(quantize(weight, b)) - weight).norm() / weight.norm() for b in (8, 4, 3, 2)}
    assert errors[8] < 0.01 < errors[4] < errors[3] < errors[2] < 0.6
    assert errors[4] / errors[8] > 8  # ~16x finer steps
    assert errors[3] / errors[4] > 1.6 and errors[2] / errors[3] > 1.6  # ~2x per bit


def test_bad_bits_and_groups_are_refused_with_an_example():
    with pytest.raises(ValueError, match="bits must be one of 8, 4, 3, 2, got 5"):
        quantize(torch.ones(4), 5)
    with pytest.raises(ValueError, match="multiple of 2"):
        quantize(torch.ones(4), 4, group_size=7)
    with pytest.raises(ValueError, match="multiple of 8 .* at 3 bits"):  # a 3-bit group must fill whole bytes
        quantize(torch.ones(4), 3, group_size=12)
    with pytest.raises(ValueError, match=r"multiple of 2 \(>= 2\) at 4 bits, got 0"):  # per row: model-level only
        quantize(torch.ones(4), 4, group_size=0)


def test_group_dividing_picks_the_largest_even_divisor():
    assert group_dividing(576, 64) == 64
    assert group_dividing(640, 128) == 128
    assert group_dividing(90, 64) == 30
    with pytest.raises(ValueError):
        group_dividing(7, 64)
    assert group_dividing(576, 256, bits=3) == 192  # multiples of 8 only: whole bytes per group
    assert group_dividing(100, 64, bits=2) == 20
    with pytest.raises(ValueError, match="multiple of 8"):
        group_dividing(90, 64, bits=3)
