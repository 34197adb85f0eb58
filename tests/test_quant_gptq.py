"""Activation-aware rounding (GPTQ): exactly round-to-nearest when inputs are uncorrelated, a smaller output
error than round-to-nearest on the trained model's real layers and inputs, and the same packed format end to end."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import bondcut
from bondcut.calibration import input_covariances
from bondcut.quant import QuantizeConfig, QuantLinear, quantize_model
from bondcut.quant.gptq import quantize_aware
from bondcut.quant.packing import dequantize, quantize

BLOCK_3 = ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj"]


def _output_error(weight: torch.Tensor, rounded: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W - Q)^T||^2 / ||X W^T||^2 from the Gram matrix X^T X."""
    d, w = (weight - rounded).double(), weight.double()
    return float(torch.trace(d @ gram @ d.T) / torch.trace(w @ gram @ w.T))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), groups=st.integers(1, 3), bits=st.sampled_from([4, 8]))
def test_uncorrelated_inputs_give_exactly_round_to_nearest(seed, rows, groups, bits):
    """A diagonal H spreads no error across columns: GPTQ must then reproduce plain rounding bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, 8 * groups, generator=gen)
    gram = torch.diag(torch.rand(8 * groups, generator=gen, dtype=torch.float64) + 0.1)
    aware, plain = quantize_aware(weight, gram, bits, group_size=8), quantize(weight, bits, 8)
    assert torch.equal(aware.codes, plain.codes)
    assert torch.equal(aware.scale, plain.scale) and torch.equal(aware.offset, plain.offset)


@pytest.fixture(scope="module")
def block_3_grams(trained_model):
    model, tokenizer = trained_model
    return input_covariances(model, tokenizer, BLOCK_3, tokens=2048)[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_output_error_on_real_inputs_is_lower_than_round_to_nearest(trained_model, block_3_grams, bits):
    model, _ = trained_model
    for name in BLOCK_3:
        weight, gram = model.get_submodule(name).weight.detach(), block_3_grams[name]
        aware = _output_error(weight, dequantize(quantize_aware(weight, gram, bits)), gram)
        plain = _output_error(weight, dequantize(quantize(weight, bits)), gram)
        assert aware < 0.8 * plain, (name, aware, plain)  # in sample; out of sample the gain is smaller


def test_gptq_model_packs_the_same_format_and_reloads(trained_model, prompt_ids, tmp_path):
    model, tokenizer = trained_model
    aware, plain = copy.deepcopy(model), copy.deepcopy(model)
    config = dict(bits=4, embeddings=False, only=tuple(BLOCK_3))
    quantize_model(aware, QuantizeConfig(**config, method="gptq", calibration_tokens=2048), tokenizer=tokenizer)
    quantize_model(plain, QuantizeConfig(**config))
    assert all(isinstance(aware.get_submodule(n), QuantLinear) for n in BLOCK_3)
    for name in BLOCK_3:  # the same layout and bytes as round-to-nearest, other codes
        a, b = aware.get_submodule(name), plain.get_submodule(name)
        assert a.layout() == b.layout() and a.codes.shape == b.codes.shape and not torch.equal(a.codes, b.codes)
    path = bondcut.save(aware, tmp_path / "gptq", tokenizer=tokenizer)
    reloaded, _ = bondcut.load(path)
    with torch.no_grad():
        assert torch.equal(reloaded(prompt_ids).logits, aware(prompt_ids).logits)


def test_bad_quantize_method_input_is_a_clear_error(trained_model):
    model, _ = trained_model
    with pytest.raises(ValueError, match="method must be one of"):
        QuantizeConfig(method="awq")
    with pytest.raises(ValueError, match="pass the tokenizer"):
        quantize_model(copy.deepcopy(model), QuantizeConfig(method="gptq", only=(BLOCK_3[0],)))
