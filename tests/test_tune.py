"""Per-layer inference choice by measured latency: exact whatever it picks, dense only when allowed."""

import torch
from torch import nn

from bondcut.mpo import decompose
from bondcut.mpo_linear import MPOLinear
from bondcut.tune import inference_extra_bytes, merge_candidates, tune


def _mpo_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        MPOLinear.from_mpo(decompose(torch.randn(64, 48), sites=3, chi=4)),
        MPOLinear.from_mpo(decompose(torch.randn(64, 64), sites="lowrank", chi=8)),
        MPOLinear.from_mpo(decompose(torch.randn(64, 64), sites="lowrank", chi=8)),
    )


def test_candidates_skip_merges_larger_than_dense_and_dense_unless_allowed():
    model = _mpo_model()
    three_site = model[0]
    without = merge_candidates(three_site, allow_dense=False)
    assert without[0] == (1, 1, 1) and (3,) not in without
    assert (3,) in merge_candidates(three_site, allow_dense=True)
    lowrank = model[1]
    assert merge_candidates(lowrank, allow_dense=False) == [(1, 1)]
    full = MPOLinear.from_mpo(decompose(torch.randn(16, 16), sites=((4, 4), (4, 4)), chi=16))  # as big as dense
    assert merge_candidates(full, allow_dense=False) == [(1, 1)]


def test_tune_keeps_outputs_and_reports_every_layer():
    model = _mpo_model()
    x = torch.randn(2, 48)
    with torch.no_grad():
        before = model(x)
    choices = tune(model, tokens=(1, 16), allow_dense=True, warmup=1, repeats=3)
    assert [c.name for c in choices] == ["0", "1", "2"]
    assert choices[2].candidates is choices[1].candidates  # same layout: measured once
    for choice, layer in zip(choices, model):
        assert layer.merge == choice.chosen
        assert choice.chosen in [tuple(int(g) for g in label.split("+")) for label in choice.candidates]
        assert all(ms > 0 for times in choice.candidates.values() for ms in times.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert (inference_extra_bytes(model) > 0) == any(layer.merge != (1,) * len(layer.sites) for layer in model)
