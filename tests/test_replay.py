"""Rerunning from block b on recorded block outputs gives the full model's loss, changed or not."""

import pytest
import torch

from bondcut.calibration import calibration_windows
from bondcut.replay import BlockReplay, block_list


def test_replay_from_any_block_equals_the_full_pass(fresh_trained_model):
    model, tokenizer = fresh_trained_model
    windows = calibration_windows(tokenizer, 256, 128)
    names = ["model.layers.0.mlp.up_proj", "model.layers.20.self_attn.q_proj"]
    runner = BlockReplay(model, windows, names)
    assert runner.block_of(names[1]) == 20 and len(runner.blocks) == 30
    base = runner.record(as_reference=True)
    assert 2 < base.loss < 6 and base.kl == 0
    same = runner.score(20)
    assert same.loss == pytest.approx(base.loss, abs=1e-5) and same.kl == pytest.approx(0, abs=1e-6)
    layer = model.get_submodule(names[1])
    with torch.no_grad():
        layer.weight.mul_(0.3)  # a real change in block 20
    changed_full = runner.score(0)
    assert abs(changed_full.loss - base.loss) > 1e-3 and changed_full.kl > 1e-3
    replayed = runner.score(20)
    assert replayed.loss == pytest.approx(changed_full.loss, abs=1e-5)
    assert replayed.kl == pytest.approx(changed_full.kl, rel=1e-4)
    assert isinstance(model.model.layers[5], type(model.model.layers[25]))  # the real blocks are back


def test_no_block_list_is_a_clear_error():
    with pytest.raises(ValueError, match="no decoder block list"):
        block_list(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["0.weight"])
