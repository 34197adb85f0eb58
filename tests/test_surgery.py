"""Model surgery on the shipped trained model, plus GPT-2 / Gemma 3 shapes and bad configurations."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, OPTConfig

import bondcut
from bondcut import CompressConfig, MPOLinear
from bondcut.architectures import UnsupportedArchitectureError


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


FIRST_MID_LAST = ["re:layers\\.(0|15|29)\\."]


def test_full_chi_gives_the_original_logits(fresh_trained_model, prompt_ids):
    model, _ = fresh_trained_model
    reference = _logits(model, prompt_ids)
    report = bondcut.compress(model, CompressConfig(chi=10**6, include=FIRST_MID_LAST))
    assert len(report.layers) == 21 and {r.kind for r in report.layers} == {"attention", "mlp"}
    assert sum(isinstance(m, MPOLinear) for m in model.modules()) == 21
    assert (_logits(model, prompt_ids) - reference).abs().max() <= 1e-4


def test_ratio_halves_the_targeted_parameters_and_the_model_degrades_but_runs(fresh_trained_model, heldout_text):
    from bondcut.perplexity import perplexity

    model, tokenizer = fresh_trained_model

    def held_out_ppl():
        return perplexity(model, tokenizer, heldout_text, context=256, stride=256, max_tokens=257).perplexity

    original = held_out_ppl()
    report = bondcut.compress(model, CompressConfig(ratio=0.5, allocation="uniform"))
    assert len(report.layers) == 30 * 7
    kept = report.target_params_after / report.target_params_before
    assert 0.49 <= kept <= 0.5
    assert all(r.params_after <= r.params_before for r in report.layers)  # small matrices capped at break-even
    assert report.model_params_before - report.model_params_after == (
        report.target_params_before - report.target_params_after
    )
    compressed = held_out_ppl()
    assert 10 < original < 80  # a trained model on real text
    assert original < compressed < float("inf")


def test_include_exclude_and_explicit_chi_per_pattern(fresh_trained_model):
    model, _ = fresh_trained_model
    config = CompressConfig(
        chi={"re:mlp": 8, "re:self_attn": 4}, include=["re:layers\\.1\\."], exclude=["re:down_proj$"]
    )
    report = bondcut.compress(model, config)
    names = [r.name for r in report.layers]
    assert len(names) == 6 and not any("down_proj" in n for n in names)
    assert {tuple(r.bond_dims) for r in report.layers if r.kind == "mlp"} == {(8,)}
    assert {tuple(r.bond_dims) for r in report.layers if r.kind == "attention"} == {(4,)}
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)


def test_a_pattern_matching_nothing_is_an_error(fresh_trained_model):
    model, _ = fresh_trained_model
    with pytest.raises(ValueError, match="matches no module"):
        bondcut.compress(model, CompressConfig(chi=4, exclude=["re:down_prj"]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "no size given"),
        ({"ratio": 0.5, "chi": 4}, "one size control"),
        ({"ratio": 1.5}, "must be in \\(0, 1\\]"),
        ({"chi": 0}, "positive int"),
        ({"chi": 4, "sites": "kron"}, "sites must be"),
        ({"tol": 2.0}, "relative error"),
    ],
)
def test_bad_configs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressConfig(**kwargs)


def _tiny(config_cls, **kwargs):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_cls(**kwargs)).eval()


def test_gpt2_conv1d_layers_are_transposed_correctly():
    model = _tiny(GPT2Config, n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    ids = torch.randint(0, 100, (2, 10))
    reference = _logits(model, ids)
    report = bondcut.compress(model, CompressConfig(chi=10**6, sites=3))
    assert [r.name.split(".", 3)[-1] for r in report.layers[:4]] == [
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    ]
    assert report.layers[0].shape == (144, 48)  # (out, in) although Conv1D stores (in, out)
    assert (_logits(model, ids) - reference).abs().max() < 1e-4


def test_gemma3_text_targets_are_found():
    model = _tiny(
        Gemma3TextConfig, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=128,
    )  # fmt: skip
    ids = torch.randint(0, 128, (1, 12))
    reference = _logits(model, ids)
    report = bondcut.compress(model, CompressConfig(chi=10**6))
    assert len(report.layers) == 14
    assert (_logits(model, ids) - reference).abs().max() < 1e-4


def test_unknown_architecture_lists_supported_ones_and_explicit_modules_work():
    model = _tiny(OPTConfig, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    with pytest.raises(UnsupportedArchitectureError, match="llama.*name the modules by hand|supported: .*llama"):
        bondcut.compress(model, CompressConfig(chi=4))
    report = bondcut.compress(model, CompressConfig(chi=4, modules=["re:layers\\.0\\.fc[12]$"]))
    assert [r.kind for r in report.layers] == ["custom", "custom"]


def test_ratio_keeps_matrices_dense_where_an_mpo_would_save_nothing():
    from transformers import LlamaConfig

    from bondcut.surgery import break_even_chi, uniform_chi_for_ratio

    model = _tiny(LlamaConfig, hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=64)  # fmt: skip
    report = bondcut.compress(model, CompressConfig(ratio=0.5, sites="lowrank", allocation="uniform"))
    dense = [r for r in report.layers if r.kept_dense]
    assert {r.name.rsplit(".", 1)[-1] for r in dense} == {"k_proj", "v_proj"}  # 16x64: break-even chi 12
    assert all("break-even" in r.kept_dense and r.params_after == r.params_before for r in dense)
    for r in report.layers:
        module = model.get_submodule(r.name)
        assert isinstance(module, nn.Linear) == bool(r.kept_dense)
        if not r.kept_dense:
            assert report.uniform_chi < break_even_chi(tuple(map(tuple, r.sites)))
    assert report.target_params_after <= 0.5 * report.target_params_before
    layouts = [((16, 1), (1, 64)), ((256, 1), (1, 64))]
    chi = uniform_chi_for_ratio(layouts, 0.5)  # 16x64 dense (1024) + chi * 320 <= 0.5 * 17408
    assert chi == (8704 - 1024) // 320


def test_activation_aware_compress_lowers_the_output_error_on_real_inputs(trained_model):
    import copy

    from bondcut.calibration import input_covariances
    from bondcut.mpo.whiten import output_error
    from bondcut.surgery import dense_weight

    model, tokenizer = trained_model
    names = ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    cov, _ = input_covariances(model, tokenizer, names, tokens=1024)
    errors = {}
    for tokens in (0, 1024):
        compressed = copy.deepcopy(model)
        config = CompressConfig(
            ratio=0.5, sites="lowrank", include=names, calibration_tokens=tokens, allocation="uniform"
        )
        report = bondcut.compress(compressed, config, tokenizer=tokenizer)
        assert report.target_params_after <= 0.5 * report.target_params_before
        errors[tokens] = [output_error(dense_weight(model.get_submodule(n)).detach(),
                                       compressed.get_submodule(n).to_dense().detach(), cov[n]) for n in names]  # fmt: skip
    assert all(aware < 0.9 * plain for aware, plain in zip(errors[1024], errors[0]))
    with pytest.raises(ValueError, match="need the tokenizer"):
        bondcut.compress(
            copy.deepcopy(model), CompressConfig(ratio=0.5, include=names, calibration_tokens=64, allocation="uniform")
        )
