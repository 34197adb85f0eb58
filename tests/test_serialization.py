"""Save/load the Hugging Face way: fresh-process reload, tied embeddings, atomic writes, export_dense."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import bondcut
from bondcut import CompressConfig, MPOLinear

SOME_LAYERS = ["re:layers\\.(2|27)\\."]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, trained_model, prompt_ids):
    """A model with two blocks compressed, saved, with its in-memory logits."""
    import copy

    model, tokenizer = trained_model
    model = copy.deepcopy(model)
    bondcut.compress(model, CompressConfig(chi=48, include=SOME_LAYERS))
    with torch.no_grad():
        logits = model(prompt_ids).logits
    path = tmp_path_factory.mktemp("saved") / "model"
    bondcut.save(model, path, tokenizer=tokenizer)
    torch.save({"ids": prompt_ids, "logits": logits}, path.parent / "reference.pt")
    return path, model


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_directory_is_plain_safetensors_with_the_layout_in_config(saved_model):
    path, _ = saved_model
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bondcut_mpo" and quant["format_version"] == 1
    layout = quant["layers"]["model.layers.2.mlp.up_proj"]
    assert layout == {"shape": [1536, 576], "sites": [[48, 24], [32, 24]], "bond_dims": [48], "bias": False,
                      "source_kind": "linear"}  # fmt: skip
    assert len(quant["layers"]) == 14


def test_transformers_from_pretrained_reloads_exactly_in_a_fresh_process(saved_model):
    path, _ = saved_model
    result = _run(f"""
        import torch, bondcut
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ref = torch.load({str(path.parent / "reference.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(path)!r})
        tok = AutoTokenizer.from_pretrained({str(path)!r})
        with torch.no_grad():
            diff = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        n_mpo = sum(isinstance(m, bondcut.MPOLinear) for m in model.modules())
        out = model.generate(tok("The capital of France is", return_tensors="pt").input_ids, max_new_tokens=5,
                             do_sample=False)
        print("RESULT", diff, tied, n_mpo, out.shape[1])
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    diff, tied, n_mpo, length = result.stdout.split("RESULT")[1].split()
    assert float(diff) <= 1e-5
    assert tied == "True" and int(n_mpo) == 14 and int(length) > 6


def test_bondcut_load_gives_the_same_model(saved_model, prompt_ids):
    path, model = saved_model
    loaded, tokenizer = bondcut.load(path)
    assert tokenizer is not None
    with torch.no_grad():
        assert torch.equal(loaded(prompt_ids).logits, model(prompt_ids).logits)


def test_loading_without_bondcut_is_loud_not_silent(saved_model):
    path, _ = saved_model
    result = _run(f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(path)!r})
    """)
    # transformers offers no hook to refuse an unknown quant_method; it warns and re-initializes the layers.
    assert "Unknown quantization type, got bondcut_mpo" in result.stderr
    assert "MISSING" in result.stderr


def test_newer_format_version_is_refused(saved_model, tmp_path):
    path, _ = saved_model
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    copy_dir = tmp_path / "future"
    copy_dir.mkdir()
    for item in path.iterdir():
        (copy_dir / item.name).symlink_to(item)
    (copy_dir / "config.json").unlink()
    (copy_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade bondcut"):
        bondcut.load(copy_dir)


def test_save_refuses_to_overwrite_unless_asked(saved_model):
    path, model = saved_model
    with pytest.raises(FileExistsError, match="overwrite"):
        bondcut.save(model, path)


def test_a_save_killed_midway_leaves_no_loadable_directory(tmp_path):
    target = tmp_path / "killed"
    result = _run(f"""
        import os, signal, torch, bondcut
        from transformers import GPT2Config, AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
        bondcut.compress(model, bondcut.CompressConfig(chi=4))
        real = model.save_pretrained
        def save_then_die(path, **kwargs):
            real(path, **kwargs)  # weights and config are fully written ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the save completes
        model.save_pretrained = save_then_die
        bondcut.save(model, {str(target)!r})
    """)
    assert result.returncode == -9
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".killed.partial-") for name in leftovers)
    with pytest.raises(FileNotFoundError):
        bondcut.load(target)


def test_export_dense_gives_a_plain_model_with_the_same_outputs(saved_model, prompt_ids, tmp_path):
    _, model = saved_model
    import copy

    dense = bondcut.export_dense(copy.deepcopy(model))
    assert not any(isinstance(m, MPOLinear) for m in dense.modules())
    assert not hasattr(dense.config, "quantization_config")
    with torch.no_grad():
        assert (dense(prompt_ids).logits - model(prompt_ids).logits).abs().max() < 1e-4
    bondcut.save(dense, tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
