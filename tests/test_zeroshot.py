"""Zero-shot tasks: the builders are deterministic and use only held-out text; through lm-eval the trained
model beats chance and a random-weights model does not; bad task names are clear errors (API and CLI)."""

from __future__ import annotations

import collections
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from bondcut.cli import app
from bondcut.corpus import split_files, split_text
from bondcut.zeroshot import TASKS, build_cloze, build_lastword, load_items, zero_shot
from bondcut.zeroshot.sentences import split_runs, split_sentence_texts

LIMIT = 40  # items per task scored by the model tests (cloze: 4 requests each); ~60 s for both models on 2 cores
runner = CliRunner()


@pytest.fixture(scope="module")
def heldout():
    """``(file, runs)`` of the held-out split and ``(file, line) -> (run, index)`` to find any sentence."""
    files = split_runs("heldout")
    where = {(s.file, s.line): (run, i) for _, runs in files for run in runs for i, s in enumerate(run)}
    return files, where


@pytest.fixture(scope="module")
def items():
    return {name: load_items(name) for name in TASKS}


def _sentence(where, item_id: str):
    file, line = item_id.split(":")
    return where[(file, int(line))]


def test_builders_are_deterministic_and_match_the_cached_task_files(heldout, items):
    files, _ = heldout
    exclude = split_sentence_texts("train", "calibration")
    for name, build in (("brown_cloze", build_cloze), ("brown_lastword", build_lastword)):
        first, second = build(files, exclude=exclude), build(files, exclude=exclude)
        assert first == second
        assert first == items[name], f"cached {name}.jsonl differs from its builder: bump TASKS_VERSION"
        assert len(first) == 500
    assert build_cloze(files, seed=1, exclude=exclude) != items["brown_cloze"]


def test_cloze_gold_is_the_true_next_sentence(heldout, items):
    _, where = heldout
    for item in items["brown_cloze"]:
        run, index = _sentence(where, item["id"])
        assert item["choices"][item["label"]] == " " + run[index].text
        assert index > 0 and item["context"].endswith(run[index - 1].text)
        assert item["context"] in " ".join(sentence.text for sentence in run[:index])
        assert 40 <= len(item["context"].split()) <= 120


def test_cloze_distractors_come_from_other_files_and_match_the_gold_length(items):
    ranks = collections.Counter()
    for item in items["brown_cloze"]:
        choices, label, files = item["choices"], item["label"], item["choice_files"]
        assert len(set(choices)) == 4 and all(choice.startswith(" ") for choice in choices)
        assert files[label] == item["file"]
        assert all(file != item["file"] for i, file in enumerate(files) if i != label)
        gold = len(choices[label])
        assert all(0.75 * gold - 1 <= len(choice) <= 1.25 * gold + 1 for choice in choices)
        ranks[sorted(map(len, choices)).index(gold)] += 1
    labels = collections.Counter(item["label"] for item in items["brown_cloze"])
    assert min(ranks.values()) > 90 and min(labels.values()) > 90  # neither length nor position tells (500 / 4)


def test_lastword_target_is_the_passage_last_word_and_appears_earlier(heldout, items):
    _, where = heldout
    for item in items["brown_lastword"]:
        word = item["target"].removeprefix(" ")
        assert item["target"] == f" {word}" and word.isalpha() and len(word) >= 3
        assert re.search(rf"\b{word}\b", item["context"], flags=re.IGNORECASE)
        run, index = _sentence(where, item["id"])
        text = " ".join(sentence.text for sentence in run[: index + 1])
        assert text.rstrip(".?!\"'").endswith(item["context"] + item["target"])
        assert 50 <= len((item["context"] + item["target"]).split()) <= 150


def test_items_use_only_heldout_text(items):
    heldout_files = set(split_files("heldout"))
    seen_text = split_text("train") + "\n" + split_text("calibration")
    for item in items["brown_cloze"]:
        assert {item["file"], *item["choice_files"]} <= heldout_files
        assert item["context"] not in seen_text
        assert not any(choice.strip() in seen_text for choice in item["choices"])
    for item in items["brown_lastword"]:
        assert item["file"] in heldout_files
        assert item["context"] + item["target"] not in seen_text


def test_unknown_task_or_limit_is_a_clear_error_before_any_work():
    with pytest.raises(ValueError, match="'nope'.*available tasks: brown_cloze, brown_lastword"):
        zero_shot(None, None, tasks=("brown_cloze", "nope"))
    with pytest.raises(ValueError, match="limit must be"):
        zero_shot(None, None, limit=0)
    result = runner.invoke(app, ["eval", "smollm2-135m", "--tasks", "brown_cloze,nope"])
    assert result.exit_code == 2
    assert "available tasks: brown_cloze, brown_lastword" in " ".join(result.output.split())


@pytest.fixture(scope="module")
def scores(trained_model):
    """lm-eval results on the first LIMIT items of both tasks: the trained model and a random 2-layer one."""
    model, tokenizer = trained_model
    calls = []
    trained = zero_shot(model, tokenizer, limit=LIMIT, on_request=lambda done, total: calls.append((done, total)))
    config = type(model.config).from_dict(model.config.to_dict())
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(config).eval()
    return {"trained": trained, "random": zero_shot(random_model, tokenizer, limit=LIMIT), "calls": calls}


def test_trained_model_beats_chance_on_cloze_and_random_weights_do_not(scores):
    trained, random_ = scores["trained"]["brown_cloze"], scores["random"]["brown_cloze"]
    assert trained["n"] == random_["n"] == LIMIT
    assert trained["acc"] - 2 * trained["acc_stderr"] > 0.25
    chance_stderr = math.sqrt(0.25 * 0.75 / LIMIT)
    assert abs(random_["acc"] - 0.25) < 3 * chance_stderr
    assert random_["acc"] < trained["acc"] - 0.15


def test_trained_model_finds_last_words_that_random_weights_miss(scores):
    trained, random_ = scores["trained"]["brown_lastword"], scores["random"]["brown_lastword"]
    assert trained["acc_norm"] is None and trained["n"] == LIMIT
    assert trained["acc"] - 2 * trained["acc_stderr"] > random_["acc"]


def test_progress_hook_counts_every_request(scores):
    done, total = scores["calls"][-1]
    assert done == total == 4 * LIMIT + LIMIT  # 4 options per cloze item, 1 request per last-word item


def test_cli_eval_reports_zero_shot_in_table_and_json(trained_model, tmp_path):
    out = tmp_path / "report.json"
    args = ["eval", "smollm2-135m", "--max-tokens", "300", "--context", "256", "--stride", "256",
            "--tasks", "brown_lastword", "--task-limit", "5", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "brown_lastword" in result.output and "acc_norm" in result.output
    row = json.loads(out.read_text())["zero_shot"]["brown_lastword"]
    assert row["n"] == 5 and 0 <= row["acc"] <= 1
