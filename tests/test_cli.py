"""The CLI end to end on the shipped model: compress prints its table and saves; info reads it; bad input."""

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from bondcut.cli import app, kept_dense_line

runner = CliRunner()


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, trained_model):
    out = tmp_path_factory.mktemp("cli") / "small"
    result = runner.invoke(
        app, ["compress", "smollm2-135m", "--chi", "16", "--include", "re:layers\\.0\\.", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def test_compress_prints_before_after_table_and_saves(compressed_dir):
    out, output = compressed_dir
    for label in ("SA+MLP params", "model params", "weights on disk (MB)", "removed"):
        assert label in output
    assert "7 matrices" in output
    report = json.loads((out / "bondcut_report.json").read_text())
    assert len(report["layers"]) == 7 and report["uniform_chi"] == 16
    assert report["target_params_after"] < report["target_params_before"]


def test_kept_dense_line_counts_every_reason_not_just_the_first():
    def layer(name, why):
        return SimpleNamespace(name=name, kept_dense=why)

    int3, int4 = "kept dense by the joint plan (packed to 3 bits)", "kept dense by the joint plan (packed to 4 bits)"
    layers = [layer("a", int4), layer("b", int3), layer("c", ""), layer("d", int3), layer("e", int3), layer("f", int3)]
    line = kept_dense_line(layers)
    assert line.startswith(f"5 matrices kept dense (4 {int3}; 1 {int4}): a, b, d, e, ...")
    assert kept_dense_line([layer("c", "")]) is None


def test_info_lists_every_layer(compressed_dir):
    out, _ = compressed_dir
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp.down_proj" in result.output and "7 MPO layers" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["compress", "no-such-model", "--chi", "4", "--out", "{tmp}/x"], "not found"),
        (["compress", "smollm2-135m", "--out", "{tmp}/x"], "no size given"),
        (["compress", "smollm2-135m", "--ratio", "2", "--out", "{tmp}/x"], "ratio"),
        (["compress", "smollm2-135m", "--chi", "4", "--sites", "many", "--out", "{tmp}/x"], "--sites"),
        (["compress", "smollm2-135m", "--chi", "4", "--exclude", "re:nothing_here", "--out", "{tmp}/x"], "matches no"),
        (["info", "{tmp}"], "no config.json"),
        (["quantize", "smollm2-135m", "--pending", "--out", "{tmp}/x"], "no pending packing"),
        (["compress", "smollm2-135m", "--ratio", "0.5", "--defer-packing", "--out", "{tmp}/x"], "give target_bytes"),
        (["compress", "smollm2-135m", "--target-bytes", "110%", "--out", "{tmp}/x"], "percentage between 0 and 100"),
        (
            ["compress", "smollm2-135m", "--target-bytes", "60MB", "--refit-tokens", "8192", "--out", "{tmp}/x"],
            "not the joint search",
        ),
    ],
)
def test_bad_input_gives_a_clear_error_and_writes_nothing(args, message, tmp_path):
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


def test_existing_output_is_not_overwritten(compressed_dir):
    out, _ = compressed_dir
    result = runner.invoke(app, ["compress", "smollm2-135m", "--chi", "4", "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_eval_reports_heldout_perplexity_and_generations(compressed_dir, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(
        app, ["eval", "smollm2-135m", "--max-tokens", "600", "--context", "256", "--stride", "128", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert 10 < report["perplexity"]["perplexity"] < 80 and report["perplexity"]["tokens_scored"] == 599
    assert "Paris" in report["generations"]["The capital of France is"]
    compressed, _ = compressed_dir
    result = runner.invoke(app, ["eval", str(compressed), "--max-tokens", "300", "--context", "256", "--stride", "256"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output


def test_eval_bad_window_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["eval", "smollm2-135m", "--context", "128", "--stride", "256"])
    assert result.exit_code == 2 and "stride must be" in " ".join(result.output.split())
    result = runner.invoke(app, ["eval", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not found" in " ".join(result.output.split())
