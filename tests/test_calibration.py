"""Streaming input statistics on the trained model equal X^T X of the captured layer inputs."""

import pytest
import torch

from bondcut.calibration import input_covariances


def test_covariances_sum_every_window_input(trained_model):
    model, tokenizer = trained_model
    names = ["model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"]
    captured = {name: [] for name in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: captured[n].append(a[0].detach()))
               for n in names]  # fmt: skip
    try:
        sums, seen = input_covariances(model, tokenizer, names, tokens=128, context=64)
    finally:
        for h in handles:
            h.remove()
    assert seen == 128
    for name in names:
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[name]]).double()
        assert x.shape[0] == 128 and sums[name].shape == (x.shape[1], x.shape[1])
        torch.testing.assert_close(sums[name], x.T @ x, rtol=1e-4, atol=1e-3)
    assert all(not model.get_submodule(n)._forward_pre_hooks for n in names)  # its hooks are gone


def test_too_little_text_is_a_clear_error(trained_model):
    model, tokenizer = trained_model
    with pytest.raises(ValueError, match="calibration tokens"):
        input_covariances(model, tokenizer, ["model.layers.0.mlp.up_proj"], tokens=10, context=64, text="Too short.")


def test_unseen_windows_come_from_text_the_statistics_did_not_see(trained_model):
    """A search measures on the calibration split's end; the input statistics take its first 16,384 tokens."""
    from bondcut.calibration import calibration_windows, unseen_calibration_windows

    _, tokenizer = trained_model
    seen = tokenizer.decode(calibration_windows(tokenizer, 16384, 512).reshape(-1))
    unseen = unseen_calibration_windows(tokenizer, 1024, 512)
    assert unseen.shape == (2, 512)
    for row in unseen:
        assert tokenizer.decode(row[5:40]) not in seen
