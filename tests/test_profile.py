"""Layer sensitivity on the trained model: real loss increases, resumable cache, CLI and bad input."""

import json

import pytest
from typer.testing import CliRunner

from bondcut.cli import app
from bondcut.profile import profile

runner = CliRunner()
BLOCK0_MLP = ["re:layers\\.0\\.mlp\\.(up|down)_proj$"]


def test_profile_measures_loss_increase_and_resumes(fresh_trained_model, tmp_path):
    model, tokenizer = fresh_trained_model
    cache = tmp_path / "p.json"
    first = profile(model, tokenizer, fractions=(0.05, 0.5), calibration_tokens=256, context=256,
                    include=BLOCK0_MLP, cache=cache)  # fmt: skip
    assert set(first.layers) == {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}
    assert first.forward_passes == 1 + 2 * 2 and 2 < first.base_loss < 6
    for entry in first.layers.values():
        assert entry.params[0] < entry.params[1] and entry.chi[0] < entry.chi[1]
        assert entry.delta_loss[0] > entry.delta_loss[1] and entry.delta_loss[0] > 0.01  # 5 % hurts more than 50 %
    calls = []
    again = profile(model, tokenizer, fractions=(0.05, 0.5), calibration_tokens=256, context=256,
                    include=BLOCK0_MLP, cache=cache, on_layer=lambda *a: calls.append(a))  # fmt: skip
    assert again.forward_passes == first.forward_passes  # everything came from the cache
    assert (
        again.layers["model.layers.0.mlp.up_proj"].delta_loss == first.layers["model.layers.0.mlp.up_proj"].delta_loss
    )
    stored = json.loads(cache.read_text())
    assert stored["version"] == 3 and len(stored["layers"]["model.layers.0.mlp.up_proj"]["error"]) == 2
    errors = first.layers["model.layers.0.mlp.up_proj"].error
    assert 1 > errors[0] > errors[1] > 0  # relative output error falls as more is kept
    kls = first.layers["model.layers.0.mlp.up_proj"].kl
    assert kls[0] > kls[1] > 0  # KL to the original: positive, and larger when less is kept


def test_cli_profile_writes_json_and_heatmap_and_rejects_bad_fractions(tmp_path):
    out = tmp_path / "profile.json"
    args = ["profile", "smollm2-135m", "--calib", "256", "--fractions", "0.25", "--include", "re:layers\\.1\\.self_attn\\.q_proj$",
            "--no-activation-aware", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["layers"] and out.with_suffix(".png").stat().st_size > 0
    bad = runner.invoke(app, ["profile", "smollm2-135m", "--fractions", "0.5,1.5", "--out", str(tmp_path / "b.json")])
    assert bad.exit_code == 2 and "fractions must be in (0, 1)" in bad.output


def test_bad_fractions_raise():
    with pytest.raises(ValueError, match="fractions"):
        profile(None, None, fractions=())
