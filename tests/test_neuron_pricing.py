"""Neuron selection priced inside the allocation: the ladder's errors and stand-ins against direct computation,
the MLP as one knapsack item, and the plan written back per matrix."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bondcut.allocate import solve_plan
from bondcut.candidates import build_candidates
from bondcut.neuron_pricing import NEURONS, NeuronSpectrum, expand_plan, kept_neurons, mlp_items
from bondcut.neurons import GatedMLP, select_neurons


def _hidden(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Correlated hidden activations (tokens, width) with unequal scales."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, max(1, width // 2), generator=g, dtype=torch.float64)
    mix = torch.randn(latent.shape[1], width, generator=g, dtype=torch.float64)
    scale = torch.rand(width, generator=g, dtype=torch.float64) * 3
    return (latent @ mix + 0.1 * torch.randn(tokens, width, generator=g, dtype=torch.float64)) * scale


@settings(max_examples=25, deadline=None)
@given(width=st.integers(2, 12), out=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_every_count_prices_and_stands_in_for_the_ridge_refit_of_select_neurons(width, out, seed):
    """For each k: the stand-in is select_neurons' refit placed at its kept neurons (zeros elsewhere), and the
    priced error is that refit's relative ridge objective, >= its relative output error, 0 with every neuron."""
    h = _hidden(50, width, seed)
    cov = h.T @ h
    down = torch.randn(out, width, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    rows = torch.zeros(width, 3, dtype=torch.float64)
    spectrum = NeuronSpectrum(down, cov, per_neuron=7)
    lam = 1e-3 * float(torch.diagonal(cov).mean())
    energy = float(torch.linalg.norm(h @ down.T) ** 2)
    errors = []
    for keep in range(1, width + 1):
        narrowed = select_neurons(rows, rows, down, cov, keep)
        expected = torch.zeros_like(down)
        expected[:, narrowed.kept] = narrowed.down
        torch.testing.assert_close(spectrum.dense(keep), expected, rtol=1e-6, atol=1e-8)
        output = float(torch.linalg.norm(h @ down.T - h[:, narrowed.kept] @ narrowed.down.T) ** 2)
        ridge = (output + lam * float(torch.linalg.norm(narrowed.down) ** 2)) / energy
        if keep < width:
            assert abs(spectrum.error(keep) - ridge) <= 1e-6 * max(1.0, ridge)
            assert spectrum.error(keep) >= output / energy - 1e-9
        errors.append(spectrum.error(keep))
        assert spectrum.params(keep) == 7 * keep
    assert errors[-1] == 0.0
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:]))  # more neurons never price worse


def _mlp_weights(d: int, h: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.gate_proj": torch.randn(h, d, generator=g), "b.up_proj": torch.randn(h, d, generator=g),
            "b.down_proj": torch.randn(d, h, generator=g), "b.q_proj": torch.randn(d, d, generator=g)}  # fmt: skip


def test_an_mlp_is_one_item_priced_for_its_three_matrices_and_the_plan_comes_back_per_matrix():
    d, h = 8, 64
    weights = _mlp_weights(d, h, 0)
    acts = {"b.gate_proj": _hidden(200, d, 1), "b.q_proj": _hidden(200, d, 2), "b.down_proj": _hidden(200, h, 3)}
    acts["b.up_proj"] = acts["b.gate_proj"]
    covs = {n: a.T @ a for n, a in acts.items()}
    mlp = GatedMLP("b.gate_proj", "b.up_proj", "b.down_proj")
    candidates = build_candidates(weights, covs, ("lowrank",))
    items = mlp_items(candidates, [mlp], weights, {"b.down_proj": covs["b.down_proj"]}, step=8)
    assert list(items) == ["b.down_proj", "b.q_proj"]  # gate and up are priced inside the down item
    options = items["b.down_proj"].options
    assert options[0].layout == "dense" and options[0].params == 3 * d * h
    assert [(o.chi, o.params) for o in options[1:]] == [(k, 3 * d * k) for k in range(8, h, 8)]
    assert all(a.error > b.error for a, b in zip(options[1:], options[2:]))

    budget = (3 * d * h + d * d) // 2
    plan = solve_plan(items, {"b.down_proj": 1.0, "b.q_proj": 1.0}, budget)
    assert plan.params <= budget
    choice = plan.layers["b.down_proj"]
    assert choice.layout == NEURONS and kept_neurons(plan, [mlp]) == {"b.down_proj": choice.chi}
    full = expand_plan(plan, [mlp], {n: tuple(w.shape) for n, w in weights.items()})
    assert list(full.layers) == ["b.gate_proj", "b.up_proj", "b.down_proj", "b.q_proj"]
    k = choice.chi
    assert [full.layers[n].params for n in mlp.names] == [k * d, k * d, d * k]
    assert [full.layers[n].sites for n in mlp.names] == [[[k, d]], [[k, d]], [[d, k]]]
    assert full.params == plan.params and full.dense_params == 3 * d * h + d * d
    assert full.predicted_loss == plan.predicted_loss == sum(c.predicted for c in full.layers.values())


def test_an_mlp_missing_a_target_matrix_or_its_statistics_stays_three_items():
    weights = _mlp_weights(8, 32, 1)
    candidates = build_candidates(weights, None, ("lowrank",))
    mlp = GatedMLP("b.gate_proj", "b.up_proj", "b.down_proj")
    assert list(mlp_items(candidates, [mlp], weights, {})) == list(candidates)  # no hidden statistics
    partial = {n: c for n, c in candidates.items() if n != "b.up_proj"}
    targets = {n: w for n, w in weights.items() if n != "b.up_proj"}  # up is not a target: the MLP is not priced
    cov = torch.eye(32)
    assert list(mlp_items(partial, [mlp], targets, {"b.down_proj": cov})) == list(partial)
    without_gate_up = {n: c for n, c in candidates.items() if n in ("b.down_proj", "b.q_proj")}
    items = mlp_items(without_gate_up, [mlp], weights, {"b.down_proj": cov})  # gate/up targets, no candidates
    assert list(items) == ["b.down_proj", "b.q_proj"] and items["b.down_proj"].options[0].params == 3 * 8 * 32


BLOCKS_2_3 = ["re:layers\\.(2|3)\\.(mlp|self_attn)\\.(q|o|gate|up|down)_proj$"]


def test_a_planned_neuron_model_fits_the_budget_follows_its_plan_beats_low_rank_and_reloads(trained_model, tmp_path):
    """Profile allocation with mlp_neurons on the trained model: the MLPs are sized in neurons by the plan (and
    the search; of their matrices only the down projections are profiled), the model holds what the plan says
    within the budget, its KL to the original on the calibration text is below the low-rank plan's at the same
    ratio, and it reloads."""
    import copy
    import json

    import bondcut
    from bondcut import CompressConfig
    from bondcut.calibration import calibration_windows
    from bondcut.mpo_linear import MPOLinear

    model, tokenizer = trained_model
    common = dict(ratio=0.5, include=BLOCKS_2_3, calibration_tokens=512, sites="lowrank",
                  profile=str(tmp_path / "p.json"), profile_tokens=128, search_evaluations=2, search_tokens=128)  # fmt: skip
    planned, lowrank = copy.deepcopy(model), copy.deepcopy(model)
    report = bondcut.compress(planned, CompressConfig(**common, mlp_neurons=True), tokenizer=tokenizer)
    profiled = json.loads((tmp_path / "p.json").read_text())["layers"]
    kinds = sorted(n.rsplit(".", 1)[1] for n in profiled)
    assert kinds == ["down_proj"] * 2 + ["o_proj"] * 2 + ["q_proj"] * 2  # gate and up: priced in their MLP
    low_report = bondcut.compress(lowrank, CompressConfig(**common), tokenizer=tokenizer)
    assert report.target_params_after <= 0.5 * report.target_params_before
    assert report.plan["method"] == "profile-knapsack+search" and report.plan["search"]["evaluations"] == 2
    layers = report.plan["layers"]
    assert sum(c["params"] for c in layers.values()) == report.target_params_after
    narrowed = [b for b in (2, 3) if layers[f"model.layers.{b}.mlp.down_proj"]["layout"] == NEURONS]
    assert narrowed, "at half the size the plan narrows at least one MLP"
    for block in narrowed:
        mlp = planned.model.layers[block].mlp
        keep = layers[f"model.layers.{block}.mlp.down_proj"]["chi"]
        assert all(layers[f"model.layers.{block}.mlp.{m}_proj"]["chi"] == keep for m in ("gate", "up"))
        assert isinstance(mlp.down_proj, MPOLinear) and mlp.down_proj.in_features == keep == mlp.gate_proj.out_features
        assert mlp.down_proj.replaced_shape == (576, 1536)

    windows = calibration_windows(tokenizer, 512, 256)
    with torch.no_grad():
        reference = torch.log_softmax(model(windows).logits, -1)
        kl = {name: float(torch.nn.functional.kl_div(torch.log_softmax(m(windows).logits, -1), reference,
                                                     log_target=True, reduction="sum")) / windows.numel()
              for name, m in (("planned", planned), ("lowrank", lowrank))}  # fmt: skip
    assert low_report.target_params_after <= 0.5 * low_report.target_params_before
    assert kl["planned"] < kl["lowrank"], kl

    path = bondcut.save(planned, tmp_path / "m", tokenizer=tokenizer)
    reloaded, _ = bondcut.load(path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows[:1]).logits, planned(windows[:1]).logits)
