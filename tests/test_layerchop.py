"""LayerChop on the trained model: the measured choice's KL is what the chopped model really scores, the
chopped model renumbers its layers, generates with a KV cache, saves and reloads as plain transformers."""

from __future__ import annotations

import pytest
import torch

import bondcut
from bondcut.calibration import calibration_windows
from bondcut.layerchop import blocks_to_remove, choose_blocks, chop, remove_blocks


def test_deepest_rule_keeps_the_last_block(trained_model):
    model, tokenizer = trained_model
    removed, _ = choose_blocks(model, tokenizer, 3, rule="deepest")
    assert removed == [26, 27, 28]


def test_measured_choice_reports_the_kl_the_chopped_model_scores(fresh_trained_model):
    model, tokenizer = fresh_trained_model
    windows = calibration_windows(tokenizer, 256, 256)
    with torch.no_grad():
        reference = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
    removed, kls = choose_blocks(model, tokenizer, 1, rule="measured", calibration_tokens=256, context=256)
    assert len(model.model.layers) == 30  # measuring leaves the model as it was
    remove_blocks(model, removed)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
    kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
    assert kl == pytest.approx(kls[0], rel=1e-3)
    assert 0 < kl < 1  # a trained model survives losing its least useful block


def test_chopped_model_renumbers_generates_and_reloads(fresh_trained_model, prompt_ids, tmp_path):
    model, tokenizer = fresh_trained_model
    report = chop(model, tokenizer, 0.2, rule="deepest")
    assert report.removed == [23, 24, 25, 26, 27, 28] and len(model.model.layers) == 24
    assert model.config.num_hidden_layers == 24
    assert [block.self_attn.layer_idx for block in model.model.layers] == list(range(24))
    assert report.params_after < report.params_before
    with torch.no_grad():
        cached = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)
        logits = model(prompt_ids).logits
    bondcut.save(model, tmp_path / "chopped", tokenizer=tokenizer)
    reloaded, _ = bondcut.load(tmp_path / "chopped")
    assert reloaded.config.num_hidden_layers == 24
    with torch.no_grad():
        assert torch.allclose(reloaded(prompt_ids).logits, logits, atol=1e-5)
        assert torch.equal(reloaded.generate(prompt_ids, max_new_tokens=6, do_sample=False), cached)


def test_bad_fractions_and_rules_are_refused(trained_model):
    model, tokenizer = trained_model
    with pytest.raises(ValueError, match="must be in"):
        blocks_to_remove(30, 1.0)
    with pytest.raises(ValueError, match="nothing to chop"):
        blocks_to_remove(30, 0.01)
    with pytest.raises(ValueError, match="rule must be one of"):
        choose_blocks(model, tokenizer, 2, rule="shallowest")
    with pytest.raises(ValueError, match="block indices"):
        remove_blocks(model, [30])
