"""``bondcut compare`` end to end on the trained model (tiny budgets): every method's row, files, resume, bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bondcut.cli import app


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_compare_writes_one_table_with_every_method_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "smollm2-135m", "--out", str(out), "--ratio", "0.5",
            "--methods", "original_tuned,int8,layerchop",
            "--heal-tokens", "512", "--eval-tokens", "256", "--chop-rule", "deepest", "--threads", "1",
            "--bench-repeats", "1", "--bench-train-batch", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compare.json").read_text())
    rows = {m["method"]: m for m in report["methods"]}
    assert list(rows) == ["original", "original_tuned", "int8", "layerchop"]
    base = rows["original"]
    tuned = rows["original_tuned"]  # the original trained on the same budget: same size, other weights
    assert tuned["disk_bytes"] == base["disk_bytes"] and tuned["perplexity_before_heal"] == base["perplexity"]
    assert tuned["perplexity"]["perplexity"] != base["perplexity"]["perplexity"]
    assert rows["int8"]["disk_bytes"] < 0.3 * base["disk_bytes"] and rows["int8"]["weights"] == base["weights"]
    chopped = rows["layerchop"]  # half the blocks gone, healed: better after healing than before
    assert chopped["target_weights"] / base["target_weights"] == 0.5
    assert chopped["perplexity"]["perplexity"] < chopped["perplexity_before_heal"]["perplexity"]
    assert rows["int8"]["perplexity"]["perplexity"] < 1.05 * base["perplexity"]["perplexity"]
    int8_before = rows["int8"]["perplexity_before_heal"]["perplexity"]  # int8 healed its scales on the same budget
    assert (
        int8_before != rows["int8"]["perplexity"]["perplexity"]
        and int8_before < 1.05 * base["perplexity"]["perplexity"]
    )
    speed = report["speed"]["per_method"]
    assert speed["original"]["decode_speedup"] == 1.0 and speed["layerchop"]["train_step_s"] > 0
    assert speed["int8"]["train_step_s"] is None  # packed weights do not train
    assert speed["original_tuned"]["decode_speedup"] is None  # the original's architecture: not timed again
    table = (out / "compare.md").read_text()
    for label in (
        "int8 (weight-only)",
        "LayerChop",
        "ppl / fine-tuned original",
        "removed blocks [14, 15,",
        "context 512, stride 256",
        "int8/int4 train their group scales and offsets",
    ):
        assert label in table
    assert (out / "compare.png").stat().st_size > 10_000
    stamp = (out / "results" / "layerchop.json").stat().st_mtime
    result = CliRunner().invoke(app, args)  # everything done: reuses results, rewrites the table
    assert result.exit_code == 0 and (out / "results" / "layerchop.json").stat().st_mtime == stamp
    speed_file = out / "results" / "speed.json"
    stale = json.loads(speed_file.read_text())
    stale["per_method"]["int8"]["decode_tokens_per_s"] = -1.0  # marks the old timing
    speed_file.write_text(json.dumps(stale))
    int8_made = (out / "results" / "int8.json").stat().st_mtime
    more = [a if a != "original_tuned,int8,layerchop" else "original_tuned,int8,int4,layerchop" for a in args]
    # a method added later and the int rows' healing setting changed: int4 is built, int8 rebuilt and both timed
    # (beside the original), not given old figures; the rest is reused
    result = CliRunner().invoke(app, [*more, "--scale-lr", "1e-4"])
    assert result.exit_code == 0, result.output
    assert "int8: made under other settings: rebuilding" in _flat(result.output)
    assert (out / "results" / "int8.json").stat().st_mtime > int8_made
    assert (out / "results" / "layerchop.json").stat().st_mtime == stamp
    rebuilt = json.loads((out / "results" / "int8.json").read_text())["settings"]
    assert rebuilt["scale_lr"] == 1e-4 and rebuilt["heal_tokens"] == 512
    again = json.loads((out / "compare.json").read_text())
    assert [m["method"] for m in again["methods"]] == ["original", "original_tuned", "int8", "int4", "layerchop"]
    assert again["speed"]["per_method"]["layerchop"] == speed["layerchop"]  # kept from the first run
    assert again["speed"]["per_method"]["int4"]["decode_tokens_per_s"] > 0
    assert again["speed"]["per_method"]["int8"]["decode_tokens_per_s"] > 0  # timed again
    assert "int4 (weight-only)" in (out / "compare.md").read_text()


def test_compare_refuses_unknown_methods_and_orphan_int4():
    result = CliRunner().invoke(app, ["compare", "smollm2-135m", "--out", "x", "--methods", "svd,awq"])
    assert result.exit_code == 2 and "unknown method(s) ['awq']" in _flat(result.output)
    result = CliRunner().invoke(app, ["compare", "smollm2-135m", "--out", "x", "--methods", "bondcut_int4"])
    assert result.exit_code == 2 and "add bondcut to --methods" in _flat(result.output)
    result = CliRunner().invoke(app, ["compare", "smollm2-135m", "--out", "x", "--joint-healing", "later"])
    assert result.exit_code == 2 and "joint_healing must be 'float'" in _flat(result.output)
    result = CliRunner().invoke(app, ["compare", "smollm2-135m", "--out", "x", "--target-bytes", "110%"])
    assert result.exit_code == 2 and "percentage between 0 and 100" in _flat(result.output)


def test_the_joint_rows_budget_may_be_a_share_of_the_fp32_weights(monkeypatch, tmp_path):
    """--target-bytes 10% is kept as a share (a setting of the joint row) and resolved against the model searched:
    the joint row's build gets 10 % of SmolLM2-135M's fp32 weight bytes."""
    import pytest

    import bondcut.compare
    from bondcut.compare import CompareConfig, method_settings, run_method
    from bondcut.joint import parse_budget

    config = CompareConfig(target_bytes=parse_budget("10%"), methods=("joint",))
    assert method_settings("joint", config)["target_bytes"] == "10%"
    assert method_settings("joint", config) != method_settings("joint", CompareConfig(target_bytes=10**8))
    seen = []

    def fake_build(method, model, tokenizer, config, target_bytes=None):
        seen.append(target_bytes)
        raise RuntimeError("stop before the search")

    monkeypatch.setattr(bondcut.compare, "build", fake_build)
    with pytest.raises(RuntimeError, match="stop before the search"):
        run_method("joint", "smollm2-135m", tmp_path, config)
    assert seen == [53_806_003]  # 10 % of 4 bytes x 134,515,008 parameters


def test_every_compare_setting_is_either_a_result_setting_or_speed_only():
    """A new CompareConfig field must say which results it changes, or a resumed run would keep stale rows."""
    from dataclasses import fields

    from bondcut.compare import METHODS, SETTINGS, SHARED_SETTINGS, SPEED_ONLY_SETTINGS, CompareConfig

    assert set(SETTINGS) == set(METHODS)
    result_settings = set(SHARED_SETTINGS).union(*SETTINGS.values())
    assert not result_settings & set(SPEED_ONLY_SETTINGS)
    assert {f.name for f in fields(CompareConfig)} == result_settings | set(SPEED_ONLY_SETTINGS)


def test_the_joint_row_heals_what_its_healing_mode_names():
    """'float' heals the float cores (packed afterwards), 'aware' the cores through their rounding beside the packed
    layers' scales; the int rows heal their scales, LayerChop everything."""
    import torch

    from bondcut import MPOLinear
    from bondcut.compare import CompareConfig, _what_trains

    with_cores = torch.nn.Sequential(MPOLinear([(4, 6), (8, 5)], [3]))
    trains = {mode: _what_trains("joint", with_cores, CompareConfig(joint_healing=mode)) for mode in ("float", "aware")}
    assert trains == {"float": "mpo", "aware": "mpo+scales"}
    from bondcut.compare import JOINT_HEALING
    from bondcut.compare_report import JOINT_HEALING_NOTES

    assert set(JOINT_HEALING_NOTES) == set(JOINT_HEALING)  # the report can say how every mode healed
    assert _what_trains("int4_gptq", with_cores, CompareConfig()) == "scales"
    assert _what_trains("layerchop", with_cores, CompareConfig()) == "all"


def _joint_search_config(monkeypatch, config):
    """The CompressConfig the joint row hands its search (for 100 MB), caught before the search runs."""
    import pytest

    import bondcut.surgery
    from bondcut.compare import build

    seen = []

    def fake_compress(model, compress_config, tokenizer=None):
        seen.append(compress_config)
        raise RuntimeError("stop before the search")

    monkeypatch.setattr(bondcut.surgery, "compress", fake_compress)
    with pytest.raises(RuntimeError, match="stop before the search"):
        build("joint", None, None, config, target_bytes=10**8)
    return seen[0]


def test_the_joint_row_is_planned_for_healing_when_it_heals(monkeypatch):
    """With a healing budget the joint plan weights rounding damage as healing leaves it; without one, as packed.
    The weight reaches the joint search and is a setting of the joint result (a change rebuilds it)."""
    from bondcut.compare import CompareConfig, method_settings
    from bondcut.joint import HEALED_ROUNDING_WEIGHT

    assert CompareConfig().joint_rounding_weight == HEALED_ROUNDING_WEIGHT
    assert CompareConfig(heal_tokens=0).joint_rounding_weight == 1.0
    assert CompareConfig(joint_rounding_weight=0.5).joint_rounding_weight == 0.5
    assert method_settings("joint", CompareConfig()) != method_settings("joint", CompareConfig(joint_rounding_weight=1))
    seen = _joint_search_config(monkeypatch, CompareConfig(joint_rounding_weight=0.5))
    assert seen.rounding_weight == 0.5 and seen.target_bytes == 10**8 and seen.defer_packing
    result = CliRunner().invoke(app, ["compare", "smollm2-135m", "--out", "x", "--joint-rounding-weight", "2"])
    assert result.exit_code == 2 and "joint_rounding_weight must be in (0, 1]" in _flat(result.output)


def test_the_joint_rows_widths_and_objective_reach_its_search_and_are_its_settings(monkeypatch):
    """--joint-bits 8,4,3 lets the joint row round to 3 bits, --joint-objective nll makes its search minimize the
    text's NLL; both are settings (a change rebuilds the row); a width the packing does not have, a group that 3-bit
    codes cannot fill, or an unknown objective is a clear error."""
    import pytest

    from bondcut.compare import CompareConfig, method_settings

    assert _joint_search_config(monkeypatch, CompareConfig(joint_bits=(8, 4, 3))).joint_bits == (8, 4, 3)
    assert _joint_search_config(monkeypatch, CompareConfig(rotate=True)).joint_rotate  # --rotate: its packing too
    for method in ("joint", "int4_gptq", "bondcut_int4"):
        assert method_settings(method, CompareConfig()) != method_settings(method, CompareConfig(rotate=True))
    assert method_settings("joint", CompareConfig())["joint_bits"] == [8, 4]
    assert method_settings("joint", CompareConfig()) != method_settings("joint", CompareConfig(joint_bits=(8, 4, 3)))
    assert _joint_search_config(monkeypatch, CompareConfig()).search_objective == "kl"
    assert _joint_search_config(monkeypatch, CompareConfig(joint_objective="nll")).search_objective == "nll"
    assert method_settings("joint", CompareConfig()) != method_settings("joint", CompareConfig(joint_objective="nll"))
    result = CliRunner().invoke(app, ["compare", "smollm2-135m", "--out", "x", "--joint-objective", "ppl"])
    assert result.exit_code == 2 and "joint_objective must be one of" in _flat(result.output)
    assert "joint_bits" not in method_settings("bondcut", CompareConfig())
    with pytest.raises(ValueError, match="joint_bits"):
        CompareConfig(joint_bits=(8, 5))
    with pytest.raises(ValueError, match="group"):
        CompareConfig(joint_bits=(4, 3), group_size=36)
    for bits, message in (("8,5", "joint_bits"), ("8;4", "--joint-bits takes whole numbers")):
        result = CliRunner().invoke(app, ["compare", "smollm2-135m", "--out", "x", "--joint-bits", bits])
        assert result.exit_code == 2 and message in _flat(result.output), result.output


def test_a_small_healing_budget_trains_on_that_many_tokens():
    """Healing steps take 8 rows of 256 tokens; a budget below one such step takes fewer rows, not a full step."""
    from bondcut.compare import heal_rows

    assert [heal_rows(t) for t in (65536, 2048, 512, 100)] == [8, 8, 2, 1]
