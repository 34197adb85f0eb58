"""Joint allocation under a byte budget: the solver against brute force, pricing, and the trained model end to end
(the saved file fits the budget, reloads with the same logits)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import bondcut
from bondcut.allocate import LayerChoice, Plan
from bondcut.candidates import Option, build_candidates
from bondcut.cli import app
from bondcut.hf_integration import attach_layout_config, pending_packing
from bondcut.joint import (
    JointPlan,
    apply_pending_packing,
    apply_storage,
    budget_bytes,
    parse_budget,
    parse_bytes,
    priced_options,
    solve_joint,
    uniform_plans,
)
from bondcut.layerchop import names_after_removal
from bondcut.quant import quant_layouts
from bondcut.quant.packing import group_dividing
from bondcut.sizes import directory_weight_bytes


def test_parse_bytes_units_and_errors():
    assert parse_bytes("30MB") == 30_000_000
    assert parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes("12345") == 12345
    for bad in ("-3MB", "lots", "0"):
        with pytest.raises(ValueError, match="positive number of bytes"):
            parse_bytes(bad)


def test_a_budget_may_be_a_share_of_the_fp32_weights(trained_model):
    """'10%' means a tenth of the model's weights at 4 bytes per parameter (the tied head once), resolved against
    the model the search runs on; byte sizes pass through; a share outside (0, 100) names the form it wants."""
    model, _ = trained_model
    assert parse_budget("10%") == parse_budget(" 10.0 %") == "10%" and parse_budget("60MB") == 60_000_000
    assert budget_bytes("10%", model) == 53_806_003  # SmolLM2-135M: 134,515,008 parameters
    assert budget_bytes(parse_budget("60MB"), model) == 60_000_000
    assert bondcut.CompressConfig(target_bytes="12.5%").target_bytes == "12.5%"
    assert bondcut.CompressConfig(target_bytes="60MB").target_bytes == 60_000_000
    for bad in ("0%", "100%", "ten%", "-5%"):
        with pytest.raises(ValueError, match="percentage between 0 and 100 such as 10%"):
            bondcut.CompressConfig(target_bytes=bad)


def _option(nbytes: int, error: float) -> Option:
    return Option("lowrank", 1, nbytes, error, nbytes=nbytes)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.lists(st.tuples(st.integers(1, 30), st.floats(0, 1)), min_size=1, max_size=3), min_size=4,
                  max_size=4),
    deletion_kls=st.lists(st.floats(0, 2), min_size=2, max_size=2),
    emb=st.lists(st.tuples(st.integers(1, 20), st.floats(0, 1)), min_size=1, max_size=3),
    budget=st.integers(10, 120),
)  # fmt: skip
def test_solver_matches_brute_force(data, deletion_kls, emb, budget):
    names = ["a", "b", "c", "d"]  # a, b in block 0; c, d in block 1
    options = {n: [_option(s, e) for s, e in opts] for n, opts in zip(names, data)}
    block_of = {"a": 0, "b": 0, "c": 1, "d": 1}
    embedding = {i: (s, e) for i, (s, e) in enumerate(emb)}
    fixed, block_fixed = 5, {0: 2, 1: 2}
    order = [1, 0]
    best = None
    for k in range(3):
        gone = set(order[:k])
        kept = [n for n in names if block_of[n] not in gone]
        for picks in itertools.product(*(range(len(options[n])) for n in kept), range(len(emb))):
            size = fixed - sum(block_fixed[b] for b in gone) + embedding[picks[-1]][0]
            size += sum(options[n][p].nbytes for n, p in zip(kept, picks))
            cost = (deletion_kls[k - 1] if k else 0) + embedding[picks[-1]][1]
            cost += sum(options[n][p].error for n, p in zip(kept, picks))
            if size <= budget and (best is None or cost < best - 1e-12):
                best = cost
    alphas = dict.fromkeys(names, 1.0)
    if best is None:
        with pytest.raises(ValueError, match="no way to fit"):
            solve_joint(options, alphas, embedding, block_of, order, deletion_kls, block_fixed, budget, fixed)
        return
    chosen, _, gone, stats = solve_joint(options, alphas, embedding, block_of, order, deletion_kls, block_fixed,
                                         budget, fixed)  # fmt: skip
    assert stats["bytes"] <= budget
    assert set(chosen) == {n for n in names if block_of[n] not in set(gone)}
    assert stats["predicted_kl"] == pytest.approx(best, abs=1e-9)


def test_priced_options_are_a_frontier_with_exact_dense_packing_errors(trained_model):
    model, _ = trained_model
    weight = model.model.layers[4].self_attn.o_proj.weight.detach()
    candidates = build_candidates({"o": weight}, None, ("lowrank",), packing_bits=(8, 4), packing_groups=(32, 64, 128))
    deltas = candidates["o"].packing_errors
    assert 0 < deltas[8, 64] < deltas[4, 64] < 0.05
    assert deltas[4, 32] < deltas[4, 64] < deltas[4, 128]  # smaller groups round finer
    assert candidates["o"].dense_packing_errors == deltas  # rounded to nearest either way
    options = priced_options(candidates["o"], 4, 64)
    sizes, errors = [o.nbytes for o in options], [o.error for o in options]
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)
    dense = {o.bits: o for o in options if o.layout == "dense"}
    assert dense[None].error == 0 and dense[None].nbytes == weight.numel() * 4
    assert dense[4].error == pytest.approx(deltas[4, 64]) and dense[4].nbytes == weight.numel() * 9 // 16
    assert any(o.bits == 4 and o.layout == "lowrank" for o in options)  # packed low rank is on the frontier
    dense32 = next(o for o in priced_options(candidates["o"], 4, 32) if o.layout == "dense" and o.bits == 4)
    assert dense32.error == pytest.approx(deltas[4, 32]) and dense32.nbytes == weight.numel() * 5 // 8  # 4 + 32/32 bits


def test_uniform_plans_pack_every_matrix_and_the_embedding_to_one_width_within_the_budget(trained_model):
    """The single-technique rivals of the knapsack's plan: per group size and width, every matrix dense at that
    width and the embedding too or in row tiers, kept only where the bytes fit (int8 does not fit a budget int4
    just fits; tiers smaller than the int4 table do)."""
    model, _ = trained_model
    weights = {n: model.get_submodule(n).weight.detach() for n in ("model.layers.4.self_attn.o_proj",
                                                                      "model.layers.4.mlp.down_proj")}  # fmt: skip
    candidates = build_candidates(weights, None, ("lowrank",), packing_bits=(8, 4), packing_groups=(64, 128))
    alphas = {n: 1.0 for n in weights}
    tiers = "8:0.05,4:0.45,3:0.5"
    embedding = {None: (4000, 0.0), 8: (1100, 0.01), 4: (600, 0.05), tiers: (550, 0.03)}
    priced = {g: ({n: priced_options(c, 4, g) for n, c in candidates.items()}, embedding) for g in (64, 128)}
    fixed = 1000
    int4_64 = fixed + 600 + sum(math.ceil(w.numel() * 4.5 / 8) for w in weights.values())
    plans = uniform_plans(candidates, alphas, priced, (8, 4), int4_64, fixed, 4)
    assert [(p.group_size, p.embedding_bits) for p in plans] == [(64, 4), (64, tiers), (128, 4), (128, tiers)]
    for plan in plans:  # int8 matrices are over budget, whatever the embedding
        assert plan.removed_blocks == [] and plan.predicted_bytes <= int4_64
        assert plan.plan.method == ("uniform-int4" if plan.embedding_bits == 4 else f"uniform-int4+rows-{tiers}")
        assert {(c.layout, c.bits) for c in plan.plan.layers.values()} == {("dense", 4)}
        errors = {n: priced[plan.group_size][0][n] for n in weights}
        expected = sum(next(o.error for o in errors[n] if (o.layout, o.bits) == ("dense", 4)) for n in weights)
        assert plan.predicted_kl == pytest.approx(expected + embedding[plan.embedding_bits][1])
    assert plans[0].predicted_bytes == int4_64 and plans[1].predicted_bytes == int4_64 - 50
    assert plans[2].predicted_bytes < int4_64  # groups of 128 are smaller
    assert uniform_plans(candidates, alphas, priced, (8, 4), int4_64 - 1, fixed, 4)[0].embedding_bits == tiers


def test_three_and_two_bit_packing_are_priced_between_int4_and_low_rank(trained_model):
    """With widths 4, 3, 2 asked, a dense matrix's packed options cost 4.5, 3.5, 2.5 bits (groups of 64) and
    damage it in that order; the frontier keeps what no other option beats."""
    model, _ = trained_model
    weight = model.model.layers[4].self_attn.o_proj.weight.detach()
    entry = build_candidates({"o": weight}, None, ("lowrank",), packing_bits=(4, 3, 2), packing_groups=(64,))["o"]
    deltas = entry.packing_errors
    assert deltas[4, 64] < deltas[3, 64] < deltas[2, 64]
    dense = {o.bits: o for o in priced_options(entry, 4, 64) if o.layout == "dense"}
    assert 3 in dense  # 3.5 bits at ~2x int4's error: no low rank of that size beats it on this matrix
    assert (dense[4].nbytes, dense[3].nbytes) == (weight.numel() * 9 // 16, weight.numel() * 7 // 16)


def test_rounding_weight_scales_packing_errors_and_shifts_the_plan_toward_packing(trained_model):
    """Planning for a healed model counts rounding damage at a fraction of truncation's: float options keep their
    error, packed ones carry weight x their rounding error; in the knapsack a smaller weight never buys more
    truncation, and on real q/o projections (o the more sensitive) it stops truncating q to afford int8 on o."""
    from bondcut.calibration import input_covariances

    model, tokenizer = trained_model
    names = ["model.layers.4.self_attn.q_proj", "model.layers.4.self_attn.o_proj"]
    weights = {n: model.get_submodule(n).weight.detach() for n in names}
    covs, _ = input_covariances(model, tokenizer, names, tokens=1024)
    entries = build_candidates(weights, covs, ("lowrank",), packing_bits=(8, 4), packing_rounding="gptq")
    q = entries[names[0]]
    plain = {n: {(o.layout, o.chi): o.error for o in entries[n].options} for n in names}
    for w in (1.0, 0.3):
        for o in priced_options(q, 4, 64, rounding_weight=w):
            rounding = 0 if o.bits is None else q.dense_packing_errors[o.bits, 64] if o.layout == "dense" else \
                2 * q.packing_errors[o.bits, 64]  # fmt: skip
            assert o.error == pytest.approx(plain[names[0]][o.layout, o.chi] + w * rounding)
    alphas = {names[0]: 0.2, names[1]: 5.0}
    budget = int(1.6 * weights[names[0]].numel())  # both int4 dense fit (1.125); o at int8 needs q truncated
    truncation, o_bits = [], []
    for w in (1.0, 0.6, 0.3, 0.1):
        options = {n: priced_options(entries[n], 4, 64, rounding_weight=w) for n in names}
        chosen, _, _, stats = solve_joint(options, alphas, {None: (0, 0.0)}, dict.fromkeys(names, 0), [], [], {0: 0},
                                          budget, 0)  # fmt: skip
        assert stats["bytes"] <= budget
        truncation.append(sum(alphas[n] * plain[n][o.layout, o.chi] for n, o in chosen.items()))
        o_bits.append(chosen[names[1]].bits)
    assert truncation == sorted(truncation, reverse=True)  # less weight on rounding: never more truncation
    assert truncation[0] > 0 and o_bits[0] == 8  # weight 1: q truncated to afford int8 on o
    assert truncation[-1] == 0 and o_bits[-1] == 4  # weight 0.1: both packed int4 dense


def test_gptq_packing_is_priced_as_gptq_rounds_it(trained_model):
    """The joint plan packs dense matrices with GPTQ: their price is GPTQ's measured output error (below rounding
    to nearest on the same inputs), exactly what the packed layer then holds; cores keep nearest rounding's."""
    from bondcut.calibration import input_covariances
    from bondcut.candidates import OutputError
    from bondcut.mpo.whiten import cholesky_factor
    from bondcut.quant import QuantizeConfig
    from bondcut.quant.gptq import quantize_aware
    from bondcut.quant.packing import dequantize

    model, tokenizer = trained_model
    name = "model.layers.4.self_attn.o_proj"
    weight = model.get_submodule(name).weight.detach()
    covs, _ = input_covariances(model, tokenizer, [name], tokens=1024)
    entry = build_candidates({name: weight}, covs, ("lowrank",), packing_bits=(8, 4), packing_groups=(64, 128),
                             packing_rounding="gptq")[name]  # fmt: skip
    for bits in (8, 4):
        assert 0 < entry.dense_packing_errors[bits, 64] < entry.packing_errors[bits, 64]
    metric = OutputError(weight, cholesky_factor(covs[name], 1e-2))
    stored = dequantize(quantize_aware(weight, covs[name], 4, 64, QuantizeConfig.damping))
    assert entry.dense_packing_errors[4, 64] == pytest.approx(metric(stored), rel=1e-6)
    assert torch.equal(entry.dense_packed_weights[4, 64], stored)  # what a measuring search runs in its place
    options = priced_options(entry, 4, 64)
    dense4 = next(o for o in options if o.layout == "dense" and o.bits == 4)
    assert dense4.error == pytest.approx(entry.dense_packing_errors[4, 64])
    low_rank4 = [o for o in options if o.layout == "lowrank" and o.bits == 4]
    plain = {o.chi: o.error for o in entry.options if o.layout == "lowrank"}
    nearest4 = entry.packing_errors[4, 64]
    assert low_rank4 and all(o.error == pytest.approx(plain[o.chi] + 2 * nearest4) for o in low_rank4)
    # GPTQ keeps groups inside rows: 128 asked of 576-entry rows packs (and is priced) in groups of 96
    packed = quantize_aware(weight, covs[name], 4, 128, QuantizeConfig.damping)
    dense128 = next(o for o in priced_options(entry, 4, 128) if o.layout == "dense" and o.bits == 4)
    assert packed.group_size == entry.dense_groups[128] == 96 and dense128.nbytes == packed.nbytes
    with pytest.raises(ValueError, match="packing_rounding must be one of \\('rtn', 'gptq'\\)"):
        build_candidates({name: weight}, covs, ("lowrank",), packing_bits=(4,), packing_rounding="awq")


def test_target_bytes_compress_fits_the_file_measures_what_it_builds_and_reloads(
    trained_model, fresh_trained_model, prompt_ids, tmp_path
):
    """The knapsack's plan, refined on real evaluations (--search), fits the file; the search measured the model
    the plan then builds (cores, GPTQ-packed matrices and embedding); it reloads exactly."""
    from bondcut.calibration import unseen_calibration_windows
    from bondcut.quant.kernels import packed_kernels

    original, _ = trained_model
    model, tokenizer = fresh_trained_model
    # fp32 file: 538 MB = 113 MB embedding + 28 MB in blocks 2-3's matrices + 397 MB the rest (kept as it is)
    target = 430_000_000
    config = bondcut.CompressConfig(target_bytes=target, max_deleted_blocks=1, include=["re:layers\\.(2|3)\\."],
                                    profile=str(tmp_path / "profile.json"), search_tokens=256, profile_tokens=256,
                                    calibration_tokens=1024, group_sizes=(32, 128), rounding_weight=0.3,
                                    search_evaluations=4, embedding_tiers=("8:0.25,4:0.75",))  # fmt: skip
    report = bondcut.compress(model, config, tokenizer=tokenizer)
    joint = report.joint
    assert joint["predicted_bytes"] <= target
    assert joint["embedding_bits"] in (8, 4, "8:0.25,4:0.75")  # the only ways to get under 430 MB
    search = report.plan["search"]
    assert set(search["embedding_kl"]) == {"8", "4", "8:0.25,4:0.75"}  # the tiers priced beside the widths
    json.loads(json.dumps(report.to_dict(), sort_keys=True))  # the report saves (keys of one type)
    by_group = search["predicted_kl_by_group_size"]  # one knapsack plan per group size, the least KL wins
    assert set(by_group) == {32, 128}
    starts = search["starts"]  # the knapsack's plan and every uniform plan that fits, measured
    assert starts[0]["method"] == "joint-knapsack" and starts[0]["group_size"] == min(by_group, key=by_group.get)
    uniform = {(s["method"], s["group_size"]) for s in starts[1:]}
    int4 = {(m, g) for m in ("uniform-int4", "uniform-int4+rows-8:0.25,4:0.75") for g in (32, 128)}
    assert int4 <= uniform and all(m.startswith("uniform-int8+rows") for m, _ in uniform - int4)  # int8 alone: over
    assert all(s["predicted_bytes"] <= target and s["measured_nll"] > 0 for s in starts)  # both measures recorded
    first = min(starts, key=lambda s: s["measured_kl"])  # the search starts from the best measured
    assert (joint["group_size"], joint["embedding_bits"]) == (first["group_size"], first["embedding_bits"])
    assert search["kl_before"] == pytest.approx(first["measured_kl"], rel=1e-6)
    assert search["rounding_weight"] == 0.3 and report.plan["method"] == f"{first['method']}+search"
    assert search["evaluations"] == 4 and search["kl_after"] <= search["kl_before"]
    with packed_kernels(False):  # the exact dequantizing path (the int4 kernel rounds activations to bf16)
        built = _kl_to(original, model, unseen_calibration_windows(tokenizer, 256, 256))
    assert built == pytest.approx(search["kl_after"], rel=0.05)  # GPTQ's statistics: the original's vs the plan's
    group = joint["group_size"]
    packed_groups = {layout["group_size"] for layout in quant_layouts(model).values() if "group_size" in layout}
    assert group in packed_groups <= {group, group_dividing(model.config.hidden_size, group)}  # embedding rows: 576
    with torch.no_grad():
        logits = model(prompt_ids).logits
    bondcut.save(model, tmp_path / "joint", tokenizer=tokenizer)
    assert directory_weight_bytes(tmp_path / "joint") <= target * 1.001  # safetensors header aside
    reloaded, _ = bondcut.load(tmp_path / "joint")
    with torch.no_grad():
        assert torch.equal(reloaded(prompt_ids).logits, logits)


def _kl_to(reference: torch.nn.Module, model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean KL(reference || model) per predicted token over ``windows``, as the search measures it."""
    total = 0.0
    with torch.no_grad():
        for ids in windows:
            ref = torch.log_softmax(reference(ids[None]).logits[0, :-1].float(), -1)
            out = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)
            total += float((ref.exp() * (ref - out)).sum(-1).mean())
    return total / len(windows)


def test_a_skipped_block_is_the_block_deleted(fresh_trained_model, prompt_ids):
    """While a plan is measured, a deleted block hands its input on: the same logits as removing it."""
    import copy

    from bondcut.joint import SkippedBlock
    from bondcut.layerchop import remove_blocks

    model, _ = fresh_trained_model
    removed = copy.deepcopy(model)
    remove_blocks(removed, [3])
    model.model.layers[3] = SkippedBlock(model.model.layers[3])
    with torch.no_grad():
        torch.testing.assert_close(model(prompt_ids).logits, removed(prompt_ids).logits)


def test_target_bytes_excludes_other_size_controls():
    with pytest.raises(ValueError, match="one size control"):
        bondcut.CompressConfig(ratio=0.5, target_bytes=10**8)
    with pytest.raises(ValueError, match="group_sizes applies to the joint search"):
        bondcut.CompressConfig(ratio=0.5, group_sizes=(32, 64))
    with pytest.raises(ValueError, match="group sizes must be multiples of 2"):
        bondcut.CompressConfig(target_bytes=10**8, group_sizes=(32, 63))
    with pytest.raises(ValueError, match=r"multiples of 8 \(>= 8\) for widths \(4, 3\)"):  # 3-bit groups fill bytes
        bondcut.CompressConfig(target_bytes=10**8, group_sizes=(36, 64), joint_bits=(4, 3))
    for bits in ((), (4, 5)):
        with pytest.raises(ValueError, match="joint_bits a non-empty subset of"):
            bondcut.CompressConfig(target_bytes=10**8, joint_bits=bits)
    for weight in (0, 1.5):
        with pytest.raises(ValueError, match="rounding_weight .* must be in \\(0, 1\\]"):
            bondcut.CompressConfig(target_bytes=10**8, rounding_weight=weight)
    with pytest.raises(ValueError, match="rounding_weight applies to the joint search"):
        bondcut.CompressConfig(ratio=0.5, rounding_weight=0.3)
    result = CliRunner().invoke(app, ["compress", "smollm2-135m", "--target-bytes", "60MB", "--rounding-weight", "0",
                                      "--out", "unused"])  # fmt: skip
    assert result.exit_code == 2 and "rounding_weight is the share" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["compress", "smollm2-135m", "--target-bytes", "60MB", "--group-sizes", "32;64",
                                      "--out", "unused"])  # fmt: skip
    assert result.exit_code == 2 and "--group-sizes takes whole numbers" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["compress", "smollm2-135m", "--target-bytes", "60MB", "--bits", "4,5",
                                      "--out", "unused"])  # fmt: skip
    assert result.exit_code == 2 and "joint_bits a non-empty subset" in " ".join(result.output.split())


def _hand_plan(bits: dict[str, int], removed: list[int], embedding_bits: int | None) -> JointPlan:
    """A joint plan naming which matrices pack to which bits (all dense), for storage tests."""
    layers = {name: LayerChoice("dense", None, None, 0, 0, 0.0, 0.0, b) for name, b in bits.items()}
    plan = Plan(layers=layers, budget=0, method="hand", predicted_loss=0.0)
    return JointPlan(plan, removed, embedding_bits, 0, 0, 0.0, 64)


def test_deferred_packing_after_a_reload_equals_packing_at_once(trained_model, prompt_ids, tmp_path):
    """Deleting block 1 renumbers the pending names; packing them later (inputs rotated, as the plan says) gives
    the same model as packing at once."""
    import copy

    model, tokenizer = trained_model
    bits = {"model.layers.0.mlp.up_proj": 4, "model.layers.1.mlp.up_proj": 4, "model.layers.2.self_attn.q_proj": 8,
            "model.layers.3.mlp.down_proj": 4}  # fmt: skip
    plan = _hand_plan(bits, removed=[1], embedding_bits=4)
    at_once, deferred = copy.deepcopy(model), copy.deepcopy(model)
    apply_storage(at_once, plan, "rtn", rotate=True)
    packing = apply_storage(deferred, plan, "rtn", defer_packing=True, rotate=True)
    assert packing["layers"] == {"model.layers.0.mlp.up_proj": 4, "model.layers.1.self_attn.q_proj": 8,
                                 "model.layers.2.mlp.down_proj": 4}  # fmt: skip
    assert packing["rotate"] and at_once.model.layers[2].mlp.down_proj.rotation == (64, 0)
    assert not quant_layouts(deferred) and len(deferred.model.layers) == len(model.model.layers) - 1
    attach_layout_config(deferred, pending_packing=packing)
    bondcut.save(deferred, tmp_path / "pending", tokenizer=tokenizer)
    reloaded, _ = bondcut.load(tmp_path / "pending")
    assert pending_packing(reloaded) == packing
    apply_pending_packing(reloaded)
    assert pending_packing(reloaded) is None and set(quant_layouts(reloaded)) == set(quant_layouts(at_once))
    with torch.no_grad():
        assert torch.equal(reloaded(prompt_ids).logits, at_once(prompt_ids).logits)
    with pytest.raises(ValueError, match="no pending packing"):
        apply_pending_packing(reloaded)
    args = ["quantize", str(tmp_path / "pending"), "--pending", "--out", str(tmp_path / "cli")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    packed_by_cli, _ = bondcut.load(tmp_path / "cli")
    with torch.no_grad():
        assert torch.equal(packed_by_cli(prompt_ids).logits, at_once(prompt_ids).logits)


def test_names_after_removal_renumbers_blocks_and_drops_deleted_ones(trained_model):
    model, _ = trained_model
    names = ["model.layers.0.mlp.up_proj", "model.layers.2.mlp", "model.layers.5.self_attn.o_proj", "lm_head"]
    assert names_after_removal(model, names, [2, 3]) == {
        "model.layers.0.mlp.up_proj": "model.layers.0.mlp.up_proj",
        "model.layers.2.mlp": None,
        "model.layers.5.self_attn.o_proj": "model.layers.3.self_attn.o_proj",
        "lm_head": "lm_head",
    }


def test_defer_packing_needs_the_joint_search():
    with pytest.raises(ValueError, match="give target_bytes"):
        bondcut.CompressConfig(ratio=0.5, defer_packing=True)
    with pytest.raises(ValueError, match="joint_rotate applies to the joint search's packing"):
        bondcut.CompressConfig(ratio=0.5, joint_rotate=True)


def test_row_tiers_are_priced_and_packed_as_the_search_measures_them(trained_model):
    """A tied table's row tiers are one more embedding option: priced in the bytes the packed table takes (with its
    tier index), measured closer to the original than int4 on unseen text, and packed by the plan into exactly the
    table the measurement read."""
    import copy

    from bondcut.calibration import unseen_calibration_windows
    from bondcut.joint import EmbeddingRounding, _embedding_prices, embedding_kls, embedding_precisions
    from bondcut.quant.modules import TieredQuantEmbedding
    from bondcut.quant.tiers import RowTiers

    model, tokenizer = trained_model
    tiers = "8:0.25,4:0.75"
    config = bondcut.CompressConfig(target_bytes=10**8, embedding_tiers=(tiers,))
    precisions, usage = embedding_precisions(model, tokenizer, config)
    assert precisions == (8, 4, tiers) and usage.shape == (model.config.vocab_size,)
    rounding = EmbeddingRounding(usage=usage)
    windows = unseen_calibration_windows(tokenizer, 512, 256)
    kls = embedding_kls(model, windows, (4, tiers), 64, rounding)
    assert kls[tiers] < kls[4], kls
    table = model.get_input_embeddings().weight
    prices = _embedding_prices([table], 4, 64, kls)
    assert prices[tiers] == (RowTiers.parse(tiers).nbytes(*table.shape, 64), kls[tiers])
    assert prices[4][0] < prices[tiers][0]
    packed = copy.deepcopy(model)
    apply_storage(packed, _hand_plan({}, [], tiers), "rtn", tokenizer=tokenizer)
    embedding = packed.get_input_embeddings()
    assert isinstance(embedding, TieredQuantEmbedding) and embedding.bits == (8, 4)
    ids = torch.arange(table.shape[0]).view(16, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            embedding(ids).view(table.shape), rounding.table(table, tiers, 64), rtol=0, atol=1e-6
        )
    # a plan carries the ranking it was measured with, and packing keeps it (the compressed model would rank
    # rows the corpus never holds by its own predictions); the saved plan leaves it out
    reversed_usage = -usage
    plan = replace(_hand_plan({}, [], tiers), row_usage=reversed_usage)
    assert "row_usage" not in plan.to_dict() and JointPlan.from_dict(plan.to_dict()).row_usage is None
    packed = copy.deepcopy(model)
    apply_storage(packed, plan, "rtn")  # no tokenizer needed: nothing is counted
    assert torch.equal(packed.get_input_embeddings().row_tier, RowTiers.parse(tiers).assign(reversed_usage))


def test_row_tiers_need_the_joint_search_and_whole_bytes():
    from bondcut.cli import _parse_tiers
    from bondcut.quant.tiers import DEFAULT_TIERS

    assert bondcut.CompressConfig(target_bytes=10**8).embedding_tiers == DEFAULT_TIERS  # offered unless told not to
    assert bondcut.CompressConfig(ratio=0.5).embedding_tiers == ()
    assert bondcut.CompressConfig(target_bytes=10**8, embedding_tiers=()).embedding_tiers == ()
    only_whole_bytes = bondcut.CompressConfig(target_bytes=10**8, group_sizes=(36,), joint_bits=(4,))
    assert only_whole_bytes.embedding_tiers == ("8:0.1,4:0.9",)  # 3-bit rows need groups of 8s
    assert (
        _parse_tiers(None) is None
        and _parse_tiers(["none"]) == ()
        and _parse_tiers(["8:0.5,4:0.5"]) == ("8:0.5,4:0.5",)
    )
    with pytest.raises(ValueError, match="embedding_tiers applies to the joint search"):
        bondcut.CompressConfig(ratio=0.5, embedding_tiers=("8:0.1,4:0.9",))
    with pytest.raises(ValueError, match="sum to 1"):
        bondcut.CompressConfig(target_bytes=10**8, embedding_tiers=("8:0.1,4:0.8",))
    with pytest.raises(ValueError, match="whole bytes"):
        bondcut.CompressConfig(target_bytes=10**8, group_size=36, joint_bits=(4,), embedding_tiers=("8:0.5,3:0.5",))
