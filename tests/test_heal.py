"""Healing on the trained model: the loss falls and held-out perplexity recovers, cores stay cores, distillation,
SIGKILL + --resume ends exactly like an uninterrupted run, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import bondcut
from bondcut import CompressConfig, MPOLinear
from bondcut.cli import app
from bondcut.heal import HealConfig, distillation_loss, heal, hidden_state_loss, lr_factor, trainable_parameters

runner = CliRunner()
BLOCK_1 = ["re:layers\\.1\\.mlp\\."]
SMALL = dict(tokens=64 * 4 * 6, seq_len=64, batch_size=4, micro_batch=2, lr=3e-4, eval_tokens=512)


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, trained_model):
    """Block 1's MLP at chi 16: a real, visible loss of quality to heal."""
    import copy

    model, tokenizer = trained_model
    compressed = copy.deepcopy(model)
    bondcut.compress(compressed, CompressConfig(chi=16, sites="lowrank", include=BLOCK_1))
    return bondcut.save(compressed, tmp_path_factory.mktemp("heal") / "m16", tokenizer=tokenizer)


def test_healing_lowers_loss_and_perplexity_and_trains_only_the_cores(compressed_dir):
    model, tokenizer = bondcut.load(compressed_dir)
    frozen = model.model.layers[5].self_attn.q_proj.weight.detach().clone()
    result = heal(model, tokenizer, HealConfig(**SMALL))
    assert result.steps == 6 and len(result.curve) == 6
    assert result.evals[-1]["perplexity"] < result.evals[0]["perplexity"]
    cores = sum(p.numel() for m in model.modules() if isinstance(m, MPOLinear) for p in m.parameters())
    assert result.trainable_params == cores  # AdamW: 2 fp32 moments per entry, plus a step count per tensor
    assert 8 * cores <= result.optimizer_state_bytes <= 8 * cores + 8 * 6
    assert torch.equal(model.model.layers[5].self_attn.q_proj.weight, frozen)
    assert sum(isinstance(m, MPOLinear) for m in model.modules()) == 3  # still MPO layers after training


def test_rest_lr_steps_the_dense_parameters_at_their_own_rate(compressed_dir):
    """train='all' with rest_lr: the cores move at lr while embeddings, norms and dense layers barely move. With
    eval_tokens=0 it trains without a single held-out check (its caller scores the model)."""
    model, tokenizer = bondcut.load(compressed_dir)
    cores = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp" in n and "layers.1." in n}
    rest = {n: p.detach().clone() for n, p in model.named_parameters() if n not in cores}
    result = heal(model, tokenizer, HealConfig(**{**SMALL, "eval_tokens": 0}, train="all", rest_lr=1e-9))
    assert result.evals == [] and len(result.curve) == result.steps == 6
    assert result.trainable_params == sum(p.numel() for p in model.parameters())
    after = dict(model.named_parameters())
    assert min(float((after[n] - p).abs().max()) for n, p in cores.items()) > 1e-5
    assert max(float((after[n] - p).abs().max()) for n, p in rest.items()) < 1e-6


def test_mpo_dense_trains_the_cores_and_the_dense_block_matrices_not_embeddings_or_norms(compressed_dir):
    """train='mpo+dense': what the plan kept dense adapts too, while the (tied) embedding and the norms stay."""
    model, _ = bondcut.load(compressed_dir)
    params = trainable_parameters(model, "mpo+dense")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {name for name, _ in model.named_parameters() if ".layers." in name and "norm" not in name}
    assert "model.layers.5.self_attn.q_proj.weight" in trained and "model.layers.1.mlp.up_proj.cores.0" in trained
    assert not model.model.embed_tokens.weight.requires_grad and not model.model.norm.weight.requires_grad
    assert sum(p.numel() for p in params) == sum(p.numel() for n, p in model.named_parameters() if n in trained)


def test_both_gauges_start_from_the_same_model_and_both_heal(compressed_dir):
    """Regauging changes what the optimizer sees, not the model: step 0 scores the same either way."""
    results = {}
    for gauge in ("balanced", "canonical"):
        model, tokenizer = bondcut.load(compressed_dir)
        results[gauge] = heal(model, tokenizer, HealConfig(**SMALL, gauge=gauge)).evals
    assert results["balanced"][0]["perplexity"] == pytest.approx(results["canonical"][0]["perplexity"], rel=1e-4)
    for evals in results.values():
        assert evals[-1]["perplexity"] < evals[0]["perplexity"]
    assert results["balanced"][-1]["perplexity"] != pytest.approx(results["canonical"][-1]["perplexity"], rel=1e-4)


def test_distillation_term_is_zero_for_identical_logits_and_the_schedule_warms_up_then_decays():
    logits = torch.randn(2, 5, 11)
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(2, 5, 11), 1.0)) > 0
    factors = [lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and max(factors) == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=0.01) and factors[50] > factors[90]


def test_distillation_needs_a_teacher(compressed_dir):
    model, tokenizer = bondcut.load(compressed_dir)
    with pytest.raises(ValueError, match="teacher"):
        heal(model, tokenizer, HealConfig(**SMALL, distill=0.5))


def test_hidden_state_loss_is_the_mean_relative_error_of_the_blocks_outputs():
    teacher = tuple(torch.randn(2, 5, 8) for _ in range(4))
    assert float(hidden_state_loss(teacher, teacher)) == 0.0
    doubled = (torch.randn(2, 5, 8),) + tuple(2 * h for h in teacher[1:])  # the embedding entry does not count
    assert float(hidden_state_loss(doubled, teacher)) == pytest.approx(1.0)
    one_block_off = teacher[:3] + (torch.zeros(2, 5, 8),)
    assert float(hidden_state_loss(one_block_off, teacher)) == pytest.approx(1 / 3)


def _block_error(model, teacher, ids) -> float:
    with torch.no_grad():
        mine = model(input_ids=ids, output_hidden_states=True).hidden_states
        theirs = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    return float(hidden_state_loss(mine, theirs))


def test_hidden_state_distillation_pulls_the_blocks_toward_the_teacher(compressed_dir, trained_model, heldout_text):
    """On held-out text, the healed blocks' outputs end closer to the original's with the hidden-state term than
    with next-token loss alone, on the same batches (1.6 % closer after 3 steps here), and perplexity still
    recovers."""
    teacher, tokenizer = trained_model
    ids = tokenizer(heldout_text[:4000], return_tensors="pt").input_ids[:, :256]
    errors = {}
    short = {**SMALL, "tokens": 64 * 4 * 3, "lr": 1e-3}  # 3 steps
    for weight in (0.0, 10.0):
        model, _ = bondcut.load(compressed_dir)
        errors["before"] = _block_error(model, teacher, ids)
        result = heal(model, tokenizer, HealConfig(**short, hidden_distill=weight), teacher=teacher)
        assert result.evals[-1]["perplexity"] < result.evals[0]["perplexity"]
        errors[weight] = _block_error(model, teacher, ids)
    assert errors[10.0] < 0.99 * errors[0.0] and errors[10.0] < errors["before"]


def test_hidden_state_distillation_needs_a_teacher_of_the_same_depth(compressed_dir, trained_model):
    import copy

    teacher, tokenizer = trained_model
    model, _ = bondcut.load(compressed_dir)
    with pytest.raises(ValueError, match="teacher"):
        heal(model, tokenizer, HealConfig(**SMALL, hidden_distill=1.0))
    shallow = copy.deepcopy(teacher)
    del shallow.model.layers[-1]
    shallow.config.num_hidden_layers -= 1
    with pytest.raises(ValueError, match="the model has 30 blocks and the teacher 29"):
        heal(model, tokenizer, HealConfig(**SMALL, hidden_distill=1.0), teacher=shallow)


def _heal_args(source, out, extra=()):
    return ["heal", str(source), "--out", str(out), "--tokens", str(64 * 4 * 8), "--seq-len", "64", "--batch-size", "4",
            "--micro-batch", "2", "--eval-tokens", "512", "--checkpoint-every", "2", "--teacher", "smollm2-135m",
            "--distill", "0.5", *extra]  # fmt: skip


def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(compressed_dir, tmp_path):
    whole = runner.invoke(app, _heal_args(compressed_dir, tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output
    assert "held-out perplexity" in whole.output and (tmp_path / "whole" / "heal.png").stat().st_size > 0

    out = tmp_path / "killed"
    checkpoint = tmp_path / "killed.checkpoint" / "checkpoint.pt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-m", "bondcut", *_heal_args(compressed_dir, out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["step"] >= 4:
            break
        time.sleep(0.2)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists() and checkpoint.exists()
    resumed = runner.invoke(app, _heal_args(compressed_dir, out, ["--resume"]))
    assert resumed.exit_code == 0, resumed.output
    a = json.loads((tmp_path / "whole" / "heal.json").read_text())
    b = json.loads((out / "heal.json").read_text())
    assert [p["loss"] for p in a["curve"]] == [p["loss"] for p in b["curve"]]
    assert a["evals"][-1]["perplexity"] == b["evals"][-1]["perplexity"]
    assert not checkpoint.exists()  # removed once the healed model is saved


def test_two_processes_under_torchrun_give_the_one_process_curve(compressed_dir, tmp_path):
    """DDP and FSDP2 on 2 gloo ranks, each taking half of every global batch: the same losses as one process,
    and the sharded run's gathered model saves as plain MPO layers with the one-process run's weights."""
    args = ["heal", str(compressed_dir), "--tokens", str(64 * 4 * 3), "--seq-len", "64", "--batch-size", "4",
            "--micro-batch", "2", "--eval-tokens", "256", "--checkpoint-every", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "bondcut"]
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        run = subprocess.run([*torchrun, *args, *flags, "--out", str(tmp_path / name)], env=env, capture_output=True,
                             text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
    single = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    one, ddp, fsdp = (json.loads((tmp_path / d / "heal.json").read_text()) for d in ("one", "ddp", "fsdp"))
    assert (one["processes"], ddp["processes"], fsdp["processes"]) == (1, 2, 2)
    for run in (ddp, fsdp):
        assert [p["loss"] for p in run["curve"]] == pytest.approx([p["loss"] for p in one["curve"]], abs=1e-4)
    assert fsdp["optimizer_state_bytes"] < 0.6 * one["optimizer_state_bytes"]  # each rank holds half the moments
    sharded, _ = bondcut.load(tmp_path / "fsdp")
    plain, _ = bondcut.load(tmp_path / "one")
    a, b = sharded.model.layers[1].mlp.up_proj, plain.model.layers[1].mlp.up_proj
    assert isinstance(a, MPOLinear)
    for x, y in zip(a.cores, b.cores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train", "some"], "train must be"),
        (["--batch-size", "3", "--micro-batch", "2"], "multiple of micro_batch"),
        (["--tokens", "0"], "must be positive"),
        (["--rest-lr", "1e-5"], "only applies with train='all'"),
        (["--gauge", "diagonal"], "gauge must be one of"),
        (["--hidden-distill", "-1"], "hidden_distill must be >= 0"),
        (["--eval-tokens", "1"], "eval_tokens must be 0 (no held-out checks) or >= 2"),
        (["--hidden-distill", "1", "--teacher-top-k", "64"], "set teacher_top_k=0"),
        (["--train", "mpo+dense", "--quant-pending"], "quant_pending packs the dense layers"),
    ],
)
def test_bad_heal_input_is_a_clear_error(compressed_dir, tmp_path, args, message):
    result = runner.invoke(app, ["heal", str(compressed_dir), "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("tiers", [None, "8:0.25,4:0.75"])
def test_healing_a_packed_model_trains_only_its_group_scales_and_offsets(trained_model, tmp_path, prompt_ids, tiers):
    """train='scales': the int4 model's codes stay, its fp16 scales/offsets move (float32 while training, fp16
    buffers again after), held-out perplexity falls, and the healed model saves and reloads as it is; also with the
    embedding's rows in tiers (each tier's scales train)."""
    import copy

    from bondcut.quant import QuantizeConfig, quantize_model

    model, tokenizer = trained_model
    packed = copy.deepcopy(model)
    quantize_model(packed, QuantizeConfig(bits=4, embedding_tiers=tiers), tokenizer=tokenizer)
    buffers = {n: b.clone() for n, b in packed.named_buffers()}
    result = heal(packed, tokenizer, HealConfig(**{**SMALL, "tokens": 64 * 4 * 3, "lr": 3e-4}, train="scales"))
    assert result.evals[-1]["perplexity"] < result.evals[0]["perplexity"]
    ranges = {n: b for n, b in buffers.items() if n.endswith(("scale", "offset"))}
    assert result.trainable_params == sum(b.numel() for b in ranges.values())
    after = dict(packed.named_buffers())
    assert set(after) == set(buffers) and not any(p.requires_grad for p in packed.parameters())
    assert all(torch.equal(after[n], b) for n, b in buffers.items() if n.endswith("codes"))
    assert all(after[n].dtype == torch.float16 for n in ranges)
    assert sum(not torch.equal(after[n], b) for n, b in ranges.items()) > len(ranges) // 2
    path = bondcut.save(packed, tmp_path / "int4-healed", tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.equal(bondcut.load(path)[0](prompt_ids).logits, packed(prompt_ids).logits)


def test_scales_training_needs_a_packed_model(compressed_dir):
    model, tokenizer = bondcut.load(compressed_dir)
    with pytest.raises(ValueError, match="needs a packed model"):
        heal(model, tokenizer, HealConfig(**SMALL, train="scales"))
