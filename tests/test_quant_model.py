"""Packed int8/int4 layers in the trained model: exact against dequantized references, the file shrinks,
save -> reload gives the same logits, the tied head stays tied, MPO cores can be packed too, CLI end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import bondcut
from bondcut.cli import app
from bondcut.quant import QuantEmbedding, QuantizeConfig, QuantLinear, QuantMPOLinear, TiedQuantHead, quantize_model
from bondcut.quant.dense_cache import dequantize_once
from bondcut.quant.kernels import kernel_available, packed_kernels
from bondcut.quant.packing import PER_ROW, dequantize, quantize, row_group
from bondcut.sizes import directory_weight_bytes


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    ref = torch.log_softmax(reference, -1)
    return float((ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1).mean())


@pytest.fixture(scope="module")
def int4_model(trained_model):
    model, tokenizer = trained_model
    quantized = copy.deepcopy(model)
    report = quantize_model(quantized, QuantizeConfig(bits=4))
    return quantized, tokenizer, report


def test_quant_linear_equals_a_dense_layer_with_the_dequantized_weight(trained_model):
    model, _ = trained_model
    layer = model.model.layers[2].self_attn.q_proj
    packed = quantize(layer.weight, 4, 64)
    quant = QuantLinear(packed, None)
    x = torch.randn(3, 5, layer.in_features)
    with packed_kernels(False):
        assert torch.allclose(quant(x), torch.nn.functional.linear(x, dequantize(packed)), atol=1e-6)


def test_dequantize_once_reuses_exact_weights_until_they_change(trained_model, monkeypatch):
    """Within dequantize_once: the same outputs as dequantizing per call, one dequantization per weight version
    (an in-place change to the scales is seen), none kept under gradient or after the block."""
    model, _ = trained_model
    layer = model.model.layers[2].self_attn.q_proj
    quant = QuantLinear(quantize(layer.weight, 4, 64), None)
    calls = []
    dequantizing = QuantLinear.weight_values
    monkeypatch.setattr(QuantLinear, "weight_values", lambda self: calls.append(1) or dequantizing(self))
    x = torch.randn(2, 3, layer.in_features)
    with packed_kernels(False), torch.no_grad():
        per_call = [quant(x), quant(x)]
        assert len(calls) == 2
        with dequantize_once():
            once = [quant(x), quant(x)]
            assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(once, per_call))
            quant.scale.mul_(2)  # healing's optimizer step changes scales in place
            changed = quant(x)
            assert len(calls) == 4 and not torch.equal(changed, once[0])
            assert torch.equal(changed, torch.nn.functional.linear(x, dequantizing(quant)))
        quant(x)
        assert len(calls) == 5  # the block's cache is gone
    with packed_kernels(False), dequantize_once():
        quant(x.requires_grad_(True))
        quant(x)
        assert len(calls) == 7  # under gradient every call dequantizes
    with packed_kernels(False), torch.no_grad(), dequantize_once(limit_bytes=quant.weight_values().numel() * 4 - 1):
        quant(x)
        quant(x)
        assert len(calls) == 10  # bigger than the limit: dequantized per call (plus the size asked above)


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, PER_ROW)])
def test_cpu_kernel_matches_the_dequantized_weight_and_follows_new_codes(trained_model, bits, group_size):
    """The kernel path (bf16 activations) stays within 1 % of exact; loading other codes rebuilds its cache;
    where the input needs a gradient the exact path runs, so healing around packed layers still trains."""
    if not kernel_available(bits):
        pytest.skip(f"this PyTorch build has no CPU int{bits} matmul")
    model, _ = trained_model
    layers = model.model.layers
    first, second = (QuantLinear(quantize(m.weight, bits, row_group(group_size, m.in_features)), m.bias)
                     for m in (layers[2].mlp.up_proj, layers[7].mlp.up_proj))  # fmt: skip
    x = torch.randn(3, 5, first.in_features)
    for expected_weight in (first.weight_values(), second.weight_values()):
        exact = torch.nn.functional.linear(x, expected_weight)
        with torch.no_grad():
            fast = first(x)
        assert not torch.equal(fast, exact)  # the kernel ran, not the float path
        assert float((fast - exact).norm() / exact.norm()) < 1e-2
        first.load_state_dict(second.state_dict())  # in-place copy of the codes: the next pass must see them
    x.requires_grad_(True)
    out = first(x)
    assert torch.allclose(out, torch.nn.functional.linear(x, second.weight_values()), atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_embedding_lookup_dequantizes_only_the_rows_it_reads(trained_model):
    model, _ = trained_model
    weight = model.model.embed_tokens.weight
    embedding = QuantEmbedding(quantize(weight, 4, 64))
    ids = torch.tensor([[0, 5, 49151], [17, 17, 3]])
    assert torch.equal(embedding(ids), dequantize(quantize(weight, 4, 64))[ids])


def test_int4_model_keeps_the_head_tied_and_stays_close(int4_model, trained_model, prompt_ids):
    quantized, _, report = int4_model
    original, _ = trained_model
    assert isinstance(quantized.lm_head, TiedQuantHead)
    assert isinstance(quantized.model.embed_tokens, QuantEmbedding)
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert not any(k.startswith("lm_head") for k in quantized.state_dict())  # stored once, with the embedding
    assert sum(report.bytes_after.values()) < 0.15 * sum(report.bytes_before.values())  # 4.5 of 32 bits
    with torch.no_grad():
        reference = original(prompt_ids).logits
        kl = _kl(reference, quantized(prompt_ids).logits)
        with packed_kernels(False):
            exact_kl = _kl(reference, quantized(prompt_ids).logits)
    assert 0 < kl < 0.5
    assert abs(kl - exact_kl) < 0.05 * exact_kl  # the CPU kernel (head and Linear layers) adds little


def test_int8_is_nearly_lossless_on_the_trained_model(fresh_trained_model, trained_model, prompt_ids):
    model, _ = fresh_trained_model
    quantize_model(model, QuantizeConfig(bits=8))
    with torch.no_grad():
        kl = _kl(trained_model[0](prompt_ids).logits, model(prompt_ids).logits)
    assert kl < 0.01


def test_int8_per_row_is_smaller_and_nearly_lossless_through_the_kernel(trained_model, prompt_ids, tmp_path):
    """group_size=0: one scale per row of every Linear weight and of the tied embedding/head; the model runs on
    the int8 kernel (head included), stays close to the original, and reloads with the same logits."""
    original, tokenizer = trained_model
    model = copy.deepcopy(original)
    report = quantize_model(model, QuantizeConfig(bits=8, group_size=PER_ROW))
    assert {layout["group_size"] for layout in report.layouts.values() if "group_size" in layout} == {576, 1536}
    assert sum(report.bytes_after.values()) < 0.26 * sum(report.bytes_before.values())  # 8 + 32/576 bits of 32
    with torch.no_grad():
        reference = original(prompt_ids).logits
        logits = model(prompt_ids).logits
        with packed_kernels(False):
            exact = model(prompt_ids).logits
    assert not torch.equal(logits, exact)  # the kernel ran
    assert _kl(reference, exact) < 0.01 and _kl(reference, logits) < 0.01
    bondcut.save(model, tmp_path / "int8", tokenizer=tokenizer)
    reloaded = bondcut.load(tmp_path / "int8")[0]
    with torch.no_grad(), packed_kernels(False):
        assert torch.allclose(reloaded(prompt_ids).logits, exact, atol=1e-5)


def test_saved_int4_model_is_small_and_reloads_with_the_same_logits(int4_model, prompt_ids, tmp_path):
    quantized, tokenizer, _ = int4_model
    bondcut.save(quantized, tmp_path / "q4", tokenizer=tokenizer)
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    layers = config["quantization_config"]["quantized"]
    assert layers["lm_head"] == {"kind": "tied_head", "embedding": "model.embed_tokens"}
    assert config["quantization_config"]["format_version"] == 2  # packed layers: older readers must refuse
    assert config["tie_word_embeddings"] is False
    original_bytes = directory_weight_bytes(bondcut.resolve_model("smollm2-135m"))
    assert directory_weight_bytes(tmp_path / "q4") < 0.16 * original_bytes
    reloaded, _ = bondcut.load(tmp_path / "q4")
    with torch.no_grad():
        assert torch.equal(reloaded(prompt_ids).logits, quantized(prompt_ids).logits)
    text = tokenizer.decode(reloaded.generate(prompt_ids, max_new_tokens=4, do_sample=False)[0])
    assert len(text) > len(tokenizer.decode(prompt_ids[0]))


def test_int3_model_is_smaller_still_reloads_exactly_and_sits_between_int4_and_int2(
    int4_model, trained_model, prompt_ids, tmp_path
):
    """3 and 2 bits run without a CPU kernel (dequantized in the forward): 3 bits at groups of 128 store under
    11 % of fp32, reload to the same logits, and damage the model more than int4 and less than int2."""
    original, tokenizer = trained_model
    kls = {}
    with torch.no_grad():
        reference = original(prompt_ids).logits
        kls[4] = _kl(reference, int4_model[0](prompt_ids).logits)
        for bits in (3, 2):
            model = copy.deepcopy(original)
            report = quantize_model(model, QuantizeConfig(bits=bits, group_size=128))
            kls[bits] = _kl(reference, model(prompt_ids).logits)
            if bits == 3:
                int3, int3_report = model, report
    assert kls[4] < kls[3] < kls[2]
    assert sum(int3_report.bytes_after.values()) < 0.11 * sum(int3_report.bytes_before.values())  # 3.25 of 32 bits
    bondcut.save(int3, tmp_path / "q3", tokenizer=tokenizer)
    layouts = json.loads((tmp_path / "q3" / "config.json").read_text())["quantization_config"]["quantized"]
    assert layouts["model.embed_tokens"]["bits"] == 3
    reloaded, _ = bondcut.load(tmp_path / "q3")
    with torch.no_grad():
        assert torch.equal(reloaded(prompt_ids).logits, int3(prompt_ids).logits)


def test_mpo_cores_pack_and_reload(fresh_trained_model, prompt_ids, tmp_path):
    model, tokenizer = fresh_trained_model
    bondcut.compress(model, bondcut.CompressConfig(chi=32, sites="lowrank", include=["re:layers\\.[01]\\.mlp\\."]))
    with torch.no_grad():
        before = model(prompt_ids).logits
    quantize_model(model, QuantizeConfig(bits=8, cores=True))
    mpo = model.model.layers[0].mlp.up_proj
    assert isinstance(mpo, QuantMPOLinear) and mpo.bond_dims == (32,)
    with torch.no_grad():
        after = model(prompt_ids).logits
    assert _kl(before, after) < 0.01
    bondcut.save(model, tmp_path / "m", tokenizer=tokenizer)
    reloaded, _ = bondcut.load(tmp_path / "m")
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, QuantMPOLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(prompt_ids).logits, after)


def test_cli_quantize_end_to_end_and_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", "smollm2-135m", "--bits", "5", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "bits must be one of 8, 4, 3, 2" in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()
    result = runner.invoke(app, ["quantize", "smollm2-135m", "--bits", "8", "--out", str(tmp_path / "q8")])
    assert result.exit_code == 0, result.output
    assert "weight file" in result.output and "linear" in result.output
    assert directory_weight_bytes(tmp_path / "q8") < 0.3 * directory_weight_bytes(bondcut.resolve_model("smollm2-135m"))
    result = runner.invoke(app, ["quantize", "smollm2-135m", "--out", str(tmp_path / "q8")])
    assert result.exit_code == 2 and "already exists" in " ".join(result.output.split())
