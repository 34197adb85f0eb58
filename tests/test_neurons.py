"""MLP neuron selection: the refit against a direct least-squares solve, and surgery on the trained model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bondcut
from bondcut import CompressConfig, compress
from bondcut.calibration import token_windows
from bondcut.mpo_linear import MPOLinear
from bondcut.neurons import gated_mlps, select_neurons


def _hidden(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Correlated hidden activations (tokens, width): a few latent directions plus noise."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, max(1, width // 2), generator=g, dtype=torch.float64)
    mix = torch.randn(latent.shape[1], width, generator=g, dtype=torch.float64)
    return latent @ mix + 0.1 * torch.randn(tokens, width, generator=g, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(width=st.integers(2, 12), out=st.integers(1, 6), keep=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_the_down_refit_is_the_least_squares_map_from_the_kept_neurons(width, out, keep, seed):
    """W_d' minimizes ||H W_d^T - H_S W_d'^T||^2 + lam ||W_d'||^2 (checked against lstsq on the stacked system, and
    against keeping the selected columns as they were)."""
    keep = min(keep, width)
    g = torch.Generator().manual_seed(seed + 1)
    h = _hidden(40, width, seed)
    gate, up = torch.randn(width, 3, generator=g, dtype=torch.float64), torch.randn(width, 3, dtype=torch.float64)
    down = torch.randn(out, width, generator=g, dtype=torch.float64)
    cov = h.T @ h
    narrowed = select_neurons(gate, up, down, cov, keep, ridge=1e-6)
    s = narrowed.kept
    assert s.tolist() == sorted(set(s.tolist())) and len(s) == keep
    torch.testing.assert_close(narrowed.gate, gate[s]) and torch.testing.assert_close(narrowed.up, up[s])
    lam = 1e-6 * float(torch.diagonal(cov).mean())
    system = torch.cat([h[:, s], lam**0.5 * torch.eye(keep, dtype=torch.float64)])
    targets = torch.cat([h @ down.T, torch.zeros(keep, out, dtype=torch.float64)])
    torch.testing.assert_close(narrowed.down, torch.linalg.lstsq(system, targets).solution.T, rtol=1e-5, atol=1e-7)

    def objective(w: torch.Tensor) -> float:  # what the refit minimizes: squared output error plus the ridge
        return float(torch.linalg.norm(h @ down.T - h[:, s] @ w.T) ** 2 + lam * torch.linalg.norm(w) ** 2)

    assert objective(narrowed.down) <= objective(down[:, s]) * (1 + 1e-9) + 1e-12


def test_selection_keeps_the_neurons_sending_most_output_energy_and_all_of_them_exactly():
    h = _hidden(64, 6, 0)
    h[:, 2] *= 100.0  # neuron 2 dominates the output
    down = torch.randn(3, 6, dtype=torch.float64)
    gate = up = torch.randn(6, 4, dtype=torch.float64)
    assert select_neurons(gate, up, down, h.T @ h, 1).kept.tolist() == [2]
    whole = select_neurons(gate, up, down, h.T @ h, 6, ridge=0.0)
    torch.testing.assert_close(whole.down, down)  # every neuron kept: nothing to refit


def test_select_neurons_rejects_bad_sizes():
    gate = up = torch.randn(6, 4)
    down, cov = torch.randn(3, 6), torch.eye(6)
    with pytest.raises(ValueError, match="keep must be between 1 and 6"):
        select_neurons(gate, up, down, cov, 0)
    with pytest.raises(ValueError, match="keep must be between 1 and 6"):
        select_neurons(gate, up, down, cov, 7)
    with pytest.raises(ValueError, match="6x6 hidden covariance"):
        select_neurons(gate, up, down, torch.eye(5), 3)


def _mlp_output_error(model, original, block: int, windows) -> float:
    """Relative error of one block's MLP output on ``windows``, both MLPs fed the original's inputs."""
    inputs = []
    hook = original.model.layers[block].mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        original(windows, use_cache=False)
        hook.remove()
        x = torch.cat(inputs)
        want, got = original.model.layers[block].mlp(x), model.model.layers[block].mlp(x)
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def test_narrowed_mlps_keep_the_parameter_count_beat_low_rank_and_reload(trained_model, heldout_text, tmp_path):
    """On the trained model: MLPs compressed to low rank, then the same MLPs as neuron selections. Same SA+MLP
    parameters (within one neuron per MLP), lower MLP output error on held-out text, and a save/load round trip
    that gives the same logits."""
    original, tokenizer = trained_model
    config = dict(chi=160, sites="lowrank", include=["re:layers\\.(3|20)\\.mlp\\."], calibration_tokens=4096)
    lowrank, narrowed = copy.deepcopy(original), copy.deepcopy(original)
    low_report = compress(lowrank, CompressConfig(**config), tokenizer=tokenizer)
    report = compress(narrowed, CompressConfig(**config, mlp_neurons=True), tokenizer=tokenizer)
    per_neuron = 3 * original.config.hidden_size
    assert 0 <= low_report.target_params_after - report.target_params_after < 2 * per_neuron
    gate = narrowed.model.layers[3].mlp.gate_proj
    assert isinstance(gate, MPOLinear) and gate.bond_dims == () and gate.replaced_shape == (1536, 576)
    kept = gate.out_features
    assert kept == low_report.layers[0].params_after * 3 // per_neuron  # 3 matrices at chi 160 buy this many
    entry = next(r for r in report.layers if r.name.endswith("layers.3.mlp.down_proj"))
    assert entry.shape == (576, 1536) and entry.sites == [[576, kept]] and 0 < entry.rel_error < 1
    windows = token_windows(tokenizer, heldout_text, 1024, 256)
    errors = {b: [_mlp_output_error(m, original, b, windows) for m in (lowrank, narrowed)] for b in (3, 20)}
    assert all(narrow < 0.97 * low for low, narrow in errors.values()), errors
    bondcut.save(narrowed, tmp_path / "narrow", tokenizer=tokenizer)
    reloaded, _ = bondcut.load(tmp_path / "narrow")
    assert reloaded.model.layers[20].mlp.down_proj.in_features == narrowed.model.layers[20].mlp.down_proj.in_features
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows[:1]).logits, narrowed(windows[:1]).logits)
    with pytest.raises(ValueError, match="narrowed by MLP neuron selection"):
        bondcut.export_dense(reloaded)  # a plain config has one MLP width


def test_mlp_neurons_refuses_what_it_cannot_do(trained_model):
    with pytest.raises(ValueError, match="mlp_neurons needs activation-aware"):
        CompressConfig(chi=32, mlp_neurons=True)  # plain TT-SVD: no calibration statistics
    with pytest.raises(ValueError, match="mlp_neurons needs activation-aware"):
        CompressConfig(target_bytes=10**7, mlp_neurons=True)
    assert [m.down for m in gated_mlps(trained_model[0])][:2] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_mlp_neurons_names_a_model_without_gated_mlps():
    """GPT-2's MLP has no gate: the error says so before any work (a tiny random GPT-2: only its layout matters)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="mlp_neurons needs gated MLPs.*'gpt2'"):
        compress(model, CompressConfig(chi=4, calibration_tokens=256, mlp_neurons=True), tokenizer=object())


def test_compress_cli_selects_neurons_and_info_reads_the_narrowed_layers(tmp_path, trained_model):
    """`bondcut compress --mlp-neurons` end to end on the shipped model; `bondcut info` prices the narrowed matrices
    against the shapes they replaced."""
    from typer.testing import CliRunner

    from bondcut.cli import app

    out = tmp_path / "narrow"
    args = ["compress", "smollm2-135m", "--chi", "64", "--sites", "lowrank", "--include", "re:layers\\.0\\.mlp\\.",
            "--calib-tokens", "1024", "--mlp-neurons", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    kept = 64 * (1536 + 576) * 3 // (3 * 576)  # three rank-64 factor pairs buy this many neurons
    assert layers["model.layers.0.mlp.down_proj"] == {"shape": [576, kept], "sites": [[576, kept]], "bond_dims": [],
                                                       "bias": False, "source_kind": "linear",
                                                       "replaced_shape": [576, 1536]}  # fmt: skip
    assert f"1 MLPs rebuilt as neuron selections: {kept}-{kept} of 1,536 hidden neurons kept" in " ".join(
        result.output.split()
    )
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and f"({kept}x576)" in info.output and "1536x576" in info.output
    assert f"{kept * 576 / (1536 * 576):.3f}" in info.output  # the kept share of the matrix it replaced
