"""Allocation: sensitivity fit, knapsack plan within budget, the search, and profile-allocated compress on the trained model."""

import copy
import json

import pytest
import torch

import bondcut
from bondcut import CompressConfig
from bondcut.allocate import Plan, fit_sensitivities, solve_plan
from bondcut.candidates import build_candidates

BLOCKS_2_3 = ["re:layers\\.(2|3)\\.(mlp|self_attn)\\.(q|o|gate|up|down)_proj$"]


def test_sensitivity_is_least_squares_through_the_origin_with_a_floor():
    alphas = fit_sensitivities({"a": [2.0, 1.0], "b": [-0.01, 0.0], "c": [4.0, 2.0]},
                               {"a": [1.0, 0.5], "b": [1.0, 0.5], "c": [1.0, 0.5]})  # fmt: skip
    assert alphas["a"] == pytest.approx(2.0) and alphas["c"] == pytest.approx(4.0)
    assert alphas["b"] == pytest.approx(0.02 * 3.0)  # floor: 2 % of the median positive alpha


def test_plan_spends_the_budget_where_the_sensitivity_is():
    torch.manual_seed(0)
    weights = {name: torch.randn(24, 16) @ torch.diag(torch.logspace(0, -1, 16)) for name in ("x.0.a", "x.1.b")}
    candidates = build_candidates(weights, None, layouts=("lowrank", "balanced"))
    assert {o.layout for o in candidates["x.0.a"].options} == {"dense", "lowrank", "balanced"}
    budget = 384  # half of the two matrices' 768 entries
    plan = solve_plan(candidates, {"x.0.a": 100.0, "x.1.b": 1.0}, budget)
    assert plan.params <= budget
    sensitive, tolerant = plan.layers["x.0.a"], plan.layers["x.1.b"]
    assert sensitive.params > tolerant.params and sensitive.error < tolerant.error
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_profile_allocation_beats_uniform_chi_at_equal_size_and_reloads(trained_model, tmp_path):
    from bondcut.calibration import calibration_windows

    model, tokenizer = trained_model
    common = dict(ratio=0.3, include=BLOCKS_2_3, calibration_tokens=1024, sites="lowrank")
    allocated = copy.deepcopy(model)
    report = bondcut.compress(allocated, CompressConfig(**common, profile=str(tmp_path / "p.json"), profile_tokens=256),
                              tokenizer=tokenizer)  # fmt: skip
    assert report.plan is not None and report.target_params_after <= 0.3 * report.target_params_before + 10 * 2
    assert json.loads((tmp_path / "p.json").read_text())["forward_passes"] == 1 + 10 * 2
    uniform = copy.deepcopy(model)
    uniform_report = bondcut.compress(uniform, CompressConfig(**common, allocation="uniform"), tokenizer=tokenizer)
    assert report.target_params_after <= uniform_report.target_params_after * 1.01

    windows = calibration_windows(tokenizer, 512, 256)  # the same text the allocator saw; held out is in bench/
    with torch.no_grad():
        reference = torch.log_softmax(model(windows).logits, -1)
        kl = {name: float(torch.nn.functional.kl_div(torch.log_softmax(m(windows).logits, -1), reference,
                                                     log_target=True, reduction="sum")) / windows.numel()
              for name, m in (("allocated", allocated), ("uniform", uniform))}  # fmt: skip
    assert kl["allocated"] < kl["uniform"]

    path = bondcut.save(allocated, tmp_path / "m", tokenizer=tokenizer)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["plan"]["method"] == "profile-knapsack" and len(config["plan"]["layers"]) == 10
    reloaded, _ = bondcut.load(path)
    ids = tokenizer("The river runs through the city", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, allocated(ids).logits, atol=1e-4)


def test_search_never_ends_worse_and_stays_within_budget(trained_model, tmp_path):
    from bondcut.allocate import allocate
    from bondcut.calibration import input_covariances
    from bondcut.surgery import dense_weight, select_targets, target_budget

    model, tokenizer = trained_model
    config = CompressConfig(ratio=0.3, include=BLOCKS_2_3, calibration_tokens=512, sites="lowrank",
                            profile=str(tmp_path / "p.json"), profile_tokens=128, search_evaluations=6,
                            search_tokens=128)  # fmt: skip
    names = [t.name for t in select_targets(model, config)]
    weights = {n: dense_weight(model.get_submodule(n)).detach() for n in names}
    covariances, _ = input_covariances(model, tokenizer, names, tokens=512)
    candidates = build_candidates(weights, covariances, ("lowrank",))
    before = [copy.deepcopy(model.get_submodule(n).weight) for n in names]
    plan = allocate(model, tokenizer, candidates, target_budget(model, weights, config), config)
    assert plan.method == "profile-knapsack+search" and plan.params <= plan.budget
    assert plan.search["evaluations"] == 6 and plan.search["kl_after"] <= plan.search["kl_before"]
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in zip(names, before))  # model untouched


def test_profile_allocation_needs_a_tokenizer_and_two_site_layouts(trained_model):
    model, _ = trained_model
    with pytest.raises(ValueError, match="need the tokenizer"):
        bondcut.compress(copy.deepcopy(model), CompressConfig(ratio=0.5, include=BLOCKS_2_3))
    with pytest.raises(ValueError, match="2-site layouts"):
        CompressConfig(ratio=0.5, sites=3)
    with pytest.raises(ValueError, match="allocation must be"):
        CompressConfig(ratio=0.5, allocation="greedy")


def test_cli_compress_with_ratio_prints_and_saves_the_plan(tmp_path):
    from typer.testing import CliRunner

    from bondcut.cli import app

    out = tmp_path / "m"
    args = ["compress", "smollm2-135m", "--ratio", "0.4", "--include", "re:layers\\.2\\.mlp\\.", "--calib-tokens", "512",
            "--profile-tokens", "128", "--profile", str(tmp_path / "p.json"), "--search", "2", "--search-tokens", "256",
            "--search-objective", "nll", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        "allocation (profile-knapsack+search)" in result.output
        and "allocation by module type" in result.output
        and "allocated per matrix" in result.output
    )
    report = json.loads((out / "bondcut_report.json").read_text())
    search = report["plan"]["search"]
    assert search["evaluations"] == 2 and search["tokens"] == 256 and search["objective"] == "nll"
    assert search["loss_after"] <= search["loss_before"] and "search (nll)" in " ".join(result.output.split())
    assert report["target_params_after"] <= 0.4 * report["target_params_before"]
    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "n"), "--allocation", "best"])
    assert bad.exit_code == 2 and "allocation must be 'profile' or 'uniform'" in bad.output
    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "n"), "--search-objective", "ppl"])
    assert bad.exit_code == 2 and "search_objective must be one of ('kl', 'nll')" in " ".join(bad.output.split())
