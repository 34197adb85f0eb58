"""Quantization-aware healing: the fake rounding equals packing exactly, passes gradients straight through, and
a model healed that way is stored packed with the perplexity its last evaluation measured (nothing lost at packing)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import bondcut
from bondcut import MPOLinear
from bondcut.cli import app
from bondcut.heal import HealConfig, heal
from bondcut.perplexity import heldout_perplexity
from bondcut.quant.aware import fake_quantize, make_quant_aware, pack_quant_aware
from bondcut.quant.modules import QuantEmbedding, QuantLinear, QuantMPOLinear, TiedQuantHead
from bondcut.quant.packing import dequantize, quantize

runner = CliRunner()
shapes = st.lists(st.integers(1, 12), min_size=1, max_size=4).filter(lambda s: math.prod(s) <= 3000)


@settings(max_examples=50, deadline=None)
@given(shape=shapes, bits=st.sampled_from([8, 4]), group=st.sampled_from([2, 16, 64]), seed=st.integers(0, 999))
def test_fake_rounding_is_exactly_what_packing_stores_and_its_gradient_is_the_identity(shape, bits, group, seed):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2).requires_grad_(True)
    seen = fake_quantize(weight, bits, group)
    assert torch.equal(seen.detach(), dequantize(quantize(weight.detach(), bits, group)))
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    seen.backward(upstream)
    assert torch.equal(weight.grad, upstream)


def test_cores_train_through_their_rounding_and_pack_to_the_same_outputs():
    torch.manual_seed(0)
    layer = MPOLinear([(4, 6), (8, 5)], [7])
    for core in layer.cores:
        torch.nn.init.normal_(core)
    model = torch.nn.Sequential(layer)
    trained = list(layer.parameters())
    assert make_quant_aware(model, 4, 16) == 2
    assert list(layer.parameters()) == trained  # the float cores themselves still train
    x = torch.randn(3, 30)
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in trained)
    with torch.no_grad():
        rounded = model(x)
        float_cores = [layer.cores.parametrizations[str(i)].original.detach().clone() for i in range(2)]
        unrounded = torch.nn.functional.linear(x, bondcut.mpo.cores_to_dense(float_cores), layer.bias)
    pack_quant_aware(model, 4, 16)
    assert isinstance(model[0], QuantMPOLinear)
    with torch.no_grad():
        packed = model(x)
    torch.testing.assert_close(packed, rounded, atol=1e-5, rtol=1e-5)
    assert (packed - unrounded).abs().max() > 1e-2  # int4 rounding is visible: the test can tell the two apart


def test_the_rounding_is_computed_once_per_version_of_the_weight(monkeypatch):
    """Micro-batches of one step share one rounding; an optimizer step (an in-place update) makes a new one."""
    import bondcut.quant.aware as aware

    calls = []
    real = aware.rounded_values
    monkeypatch.setattr(aware, "rounded_values", lambda *a: calls.append(1) or real(*a))
    weight = torch.nn.Parameter(torch.randn(8, 32))
    grid = aware.FakeQuantized(4, 16)
    first, again = grid(weight), grid(weight)
    (first.sum() + again.sum()).backward()  # two graphs through one rounding: both backward passes work
    assert len(calls) == 1 and torch.equal(weight.grad, torch.full_like(weight, 2.0))
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(grid(weight), fake_quantize(weight, 4, 16)) and len(calls) == 3


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, trained_model):
    """Block 1's MLP at chi 16 on the trained model."""
    import copy

    model, tokenizer = trained_model
    compressed = copy.deepcopy(model)
    bondcut.compress(compressed, bondcut.CompressConfig(chi=16, sites="lowrank", include=["re:layers\\.1\\.mlp\\."]))
    return bondcut.save(compressed, tmp_path_factory.mktemp("qat") / "m16", tokenizer=tokenizer)


def test_cli_quant_aware_heal_saves_packed_cores_that_score_what_training_measured(compressed_dir, tmp_path):
    out = tmp_path / "healed-int4"
    args = ["heal", str(compressed_dir), "--out", str(out), "--tokens", str(64 * 4 * 6), "--seq-len", "64",
            "--batch-size", "4", "--micro-batch", "2", "--lr", "3e-4", "--eval-tokens", "512",
            "--quant-bits", "4", "--quant-group-size", "32"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    evals = json.loads((out / "heal.json").read_text())["evals"]
    assert evals[-1]["perplexity"] < evals[0]["perplexity"]
    model, tokenizer = bondcut.load(out)
    layers = [m for m in model.modules() if isinstance(m, QuantMPOLinear)]
    assert len(layers) == 3 and all(m.bits == 4 and m.group_size == 32 for m in layers)
    assert not any(isinstance(m, MPOLinear) for m in model.modules())
    packed = heldout_perplexity(model, tokenizer, max_tokens=512).perplexity
    assert packed == pytest.approx(evals[-1]["perplexity"], rel=1e-4)


def test_training_everything_quant_aware_packs_every_layer_on_the_grid_it_trained_on(compressed_dir):
    """train='all': dense layers, the tied embedding/head and the cores all train through their rounding (two
    micro-batches per step share one rounding); afterwards everything is packed and scores the last evaluation."""
    model, tokenizer = bondcut.load(compressed_dir)
    small = dict(tokens=64 * 4 * 2, seq_len=64, batch_size=4, micro_batch=2, lr=1e-4, eval_tokens=512)
    result = heal(model, tokenizer, HealConfig(**small, train="all", quant_bits=8, quant_group=64))
    assert result.evals[-1]["perplexity"] < result.evals[0]["perplexity"]
    assert result.trainable_params > 100_000_000  # every weight trained, not only the cores
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding, MPOLinear)) for m in model.modules())
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), TiedQuantHead)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 7 - 3
    packed = heldout_perplexity(model, tokenizer, max_tokens=512).perplexity
    assert packed == pytest.approx(result.evals[-1]["perplexity"], rel=1e-4)


def test_a_deferred_joint_model_heals_through_its_plans_rounding_and_saves_fully_packed(compressed_dir, tmp_path):
    """--quant-pending --train mpo+scales: the plan's dense layers and embedding are packed first and their scales
    train, its MPO layers train through their planned widths, a layer the plan leaves float stays float; the saved
    model has no pending packing left and scores what the last evaluation measured."""
    from bondcut.hf_integration import attach_layout_config, pending_packing

    model, tokenizer = bondcut.load(compressed_dir)
    plan = {"model.layers.1.mlp.up_proj": 4, "model.layers.1.mlp.gate_proj": 8,
            "model.layers.2.self_attn.q_proj": 4, "model.layers.3.mlp.down_proj": 8}  # fmt: skip
    attach_layout_config(model, pending_packing={"layers": plan, "embedding_bits": 8, "group_size": 32,
                                                 "rounding": "rtn"})  # fmt: skip
    deferred = bondcut.save(model, tmp_path / "deferred", tokenizer=tokenizer)
    out = tmp_path / "healed"
    args = ["heal", str(deferred), "--out", str(out), "--tokens", str(64 * 4 * 4), "--seq-len", "64",
            "--batch-size", "4", "--micro-batch", "2", "--lr", "3e-4", "--eval-tokens", "512",
            "--quant-pending", "--train", "mpo+scales"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "heal.json").read_text())
    assert record["evals"][-1]["perplexity"] < record["evals"][0]["perplexity"]
    cores = sum(p.numel() for n, p in model.named_parameters() if "layers.1.mlp" in n)
    assert record["trainable_params"] > cores  # the packed layers' scales and offsets trained beside the cores
    healed, _ = bondcut.load(out)
    assert pending_packing(healed) is None
    layers = dict(healed.named_modules())
    assert (layers["model.layers.1.mlp.up_proj"].bits, layers["model.layers.1.mlp.gate_proj"].bits) == (4, 8)
    assert all(layers[f"model.layers.1.mlp.{n}_proj"].group_size == 32 for n in ("up", "gate"))
    assert type(layers["model.layers.1.mlp.down_proj"]) is MPOLinear  # not in the plan: float
    assert isinstance(layers["model.layers.2.self_attn.q_proj"], QuantLinear)
    assert isinstance(healed.get_input_embeddings(), QuantEmbedding)
    packed = heldout_perplexity(healed, tokenizer, max_tokens=512).perplexity
    assert packed == pytest.approx(record["evals"][-1]["perplexity"], rel=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--quant-bits", "5"], "bits must be one of 8, 4, 3, 2"),
        (["--quant-bits", "4", "--quant-group-size", "5"], "group_size must be a multiple of 2"),
        (["--quant-bits", "4", "--train", "scales"], "does not combine with train='scales'"),
        (["--quant-bits", "4", "--quant-pending"], "choose one"),
        (["--quant-pending"], "needs a model with a pending packing"),
        (["--quant-pending", "--train", "all"], "not 'all'"),
    ],
)
def test_bad_quant_aware_input_is_a_clear_error(compressed_dir, tmp_path, args, message):
    result = runner.invoke(app, ["heal", str(compressed_dir), "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x").exists()
