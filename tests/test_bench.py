"""`bondcut bench` and `bondcut report` end to end on the shipped model: complete JSON, ratios, report, bad input."""

import json

import pytest
from typer.testing import CliRunner

from bondcut.bench import BenchSettings, ratios
from bondcut.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A 3-site MPO model (blocks 0-1) benchmarked against the original with --quick shapes and tuning."""
    root = tmp_path_factory.mktemp("bench")
    model = root / "mpo"
    result = runner.invoke(app, ["compress", "smollm2-135m", "--chi", "16", "--sites", "3",
                                 "--include", "re:layers\\.[01]\\.", "--out", str(model)])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = root / "report"
    result = runner.invoke(app, ["bench", str(model), "--baseline", "smollm2-135m", "--quick", "--allow-dense",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return model, out, result.output


def test_bench_json_is_complete_with_ratios(bench_dir):
    model, out, output = bench_dir
    report = json.loads((out / "bench.json").read_text())
    assert report["baseline"] == "smollm2-135m" and list(report["models"]) == ["smollm2-135m", str(model)]
    for name, res in report["models"].items():
        inference, training = res["inference"], res["training"]
        for key in ("prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b2_tokens_per_s"):
            stats = inference[key]
            assert stats["n"] == 1 and 0 < stats["min"] <= stats["median"] <= stats["max"]
        assert inference["peak_rss_mb"] >= inference["rss_after_load_mb"] > 100
        assert training["step_s"]["median"] > 0
        assert 0 <= training["optimizer_state_bytes"] - 8 * training["trainable_params"] < 8192  # AdamW m, v (+ steps)
        assert inference["disk_bytes"] > 0 and inference["param_bytes"] == 4 * inference["params"]
    compressed = report["models"][str(model)]["inference"]
    assert compressed["mpo_layers"] == 14 and len(compressed["tune"]["layers"]) == 14
    assert all(len(layer["candidates"]) >= 2 for layer in compressed["tune"]["layers"])  # cores, merged, dense
    r = report["ratios"][str(model)]
    assert 0 < r["params"] < 1 and 0 < r["disk_bytes"] < 1 and r["optimizer_state_bytes"] < 1
    assert {"prefill_speedup", "decode_b1_speedup", "decode_b2_speedup", "train_step_speedup"} <= set(r)
    assert "vs smollm2-135m" in output


def test_report_markdown_and_plots(bench_dir, tmp_path):
    _, out, _ = bench_dir
    text = (out / "report.md").read_text()
    assert "## Speed and memory" in text and "Ratios to smollm2-135m" in text and "Per-layer inference choice" in text
    assert (out / "bench_speedup.png").stat().st_size > 0 and (out / "bench_size.png").stat().st_size > 0
    evaluation = {"model": "m", "corpus": "brown", "generations": {"Hi": " there"},
                  "perplexity": {"perplexity": 30.0, "context": 512, "stride": 256, "tokens_scored": 1000},
                  "zero_shot": {"brown_cloze": {"acc": 0.6, "acc_stderr": 0.02, "n": 500}}}  # fmt: skip
    (tmp_path / "e.json").write_text(json.dumps(evaluation))
    result = runner.invoke(app, ["report", "--bench", str(out / "bench.json"), "--eval", str(tmp_path / "e.json"),
                                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "0.600 ± 0.020 (n=500)" in text and "30.00" in text and (tmp_path / "r" / "quality.png").exists()


def test_ratios_are_speedups_and_fractions():
    base = {"inference": {"prefill_tokens_per_s": {"median": 100.0}, "params": 10, "decode_b1_tokens_per_s": {"median": 20.0}},
            "training": {"step_s": {"median": 2.0}}}  # fmt: skip
    model = {"inference": {"prefill_tokens_per_s": {"median": 150.0}, "params": 5, "decode_b1_tokens_per_s": {"median": 30.0}},
             "training": {"step_s": {"median": 1.0}}}  # fmt: skip
    assert ratios(model, base, (1,)) == {"prefill_speedup": 1.5, "train_step_speedup": 2.0, "params": 0.5,
                                         "decode_b1_speedup": 1.5}  # fmt: skip


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "no/such/dir", "--quick"], "no/such/dir"),
        (["bench", "smollm2-135m", "--quick", "--phases", "warp"], "unknown phase"),
        (["bench", "smollm2-135m", "--quick", "--train-params", "some"], "train_params"),
        (["report", "--out", "x"], "nothing to report"),
        (["report", "--out", "x", "--bench", "missing.json"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, message, tmp_path):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_settings_validate():
    with pytest.raises(ValueError, match="repeats"):
        BenchSettings(repeats=0)
