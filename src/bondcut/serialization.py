"""Save and load compressed models as ordinary Hugging Face directories (safetensors + config.json).

The MPO layout rides in ``config.json`` as a transformers quantization config (see
:mod:`bondcut.hf_integration`), so ``AutoModelForCausalLM.from_pretrained(dir)`` reloads the model once
bondcut is imported. Saves are atomic: the directory appears complete or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .cache import atomic_directory
from .mpo_linear import MPOLinear


def save(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``, and text ``extra_files`` such as a report) to ``path``, atomically.

    Raises FileExistsError if ``path`` exists, unless ``overwrite``. A killed save leaves at most a hidden
    ``.NAME.partial-*`` directory, never a ``path`` that loads as if complete.
    """
    from .hf_integration import attach_layout_config, has_bondcut_layers

    if has_bondcut_layers(model):
        attach_layout_config(model)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def load(path: str | os.PathLike, dtype: str = "float32"):
    """Load a bondcut directory (or any name :func:`bondcut.models.resolve_model` accepts) -> (model, tokenizer)."""
    from .models import load_model

    return load_model(path, dtype=dtype)


def export_dense(model: nn.Module) -> nn.Module:
    """Multiply every MPOLinear back into a dense ``nn.Linear``/``Conv1D``, in place, for runtimes without MPOs.

    The result is a plain transformers model: its config loses the bondcut quantization entry. A model whose MLPs
    were narrowed by neuron selection (:mod:`bondcut.neurons`) is refused: a plain config has one MLP width.
    """
    from .surgery import linear_with_weight

    narrowed = [n for n, m in model.named_modules() if isinstance(m, MPOLinear) and m.narrowed]
    if narrowed:
        raise ValueError(f"{len(narrowed)} layers (e.g. {narrowed[0]}) were narrowed by MLP neuron selection; a plain "
                         "transformers config holds one MLP width, so keep this model in bondcut's format "
                         "(bondcut.save) or compress it without mlp_neurons")  # fmt: skip

    for name, module in list(model.named_modules()):
        if not isinstance(module, MPOLinear):
            continue
        weight = module.to_dense().detach()  # (out, in)
        has_bias = module.bias is not None
        if module.source_kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(module.out_features, module.in_features)
            dense.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(weight.t())
                dense.bias.copy_(module.bias if has_bias else torch.zeros_like(dense.bias))
        else:
            dense = linear_with_weight(weight, module.bias.detach() if has_bias else None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    return model
