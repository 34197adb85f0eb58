"""Which weight matrices are the self-attention and MLP layers, per Hugging Face ``model_type``.

Support for an architecture is data: a block prefix (where the decoder layers live) and the module-name
suffixes of its attention and MLP matrices. Anything else can be compressed by naming modules explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ArchitectureTargets:
    """Where the decoder blocks are (regex with the block index as group 1) and their matrices' suffixes."""

    block_prefix: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    gated_mlp: tuple[str, str, str] | None = None  # (gate, up, down) suffixes where the MLP is gated

    def pattern(self) -> re.Pattern:
        suffixes = "|".join(re.escape(s) for s in (*self.attention, *self.mlp))
        return re.compile(rf"{self.block_prefix}({suffixes})$")


_DECODER = r"(?:^|\.)layers\.(\d+)\."
_LLAMA_LIKE = ArchitectureTargets(_DECODER, LLAMA_ATTENTION, LLAMA_MLP, LLAMA_MLP)

ARCHITECTURES: dict[str, ArchitectureTargets] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    # multimodal Gemma 3: only the language model (its vision tower also has self_attn.q_proj modules)
    "gemma3": ArchitectureTargets(r"(?:^|\.)language_model\.layers\.(\d+)\.", LLAMA_ATTENTION, LLAMA_MLP, LLAMA_MLP),
    "gpt2": ArchitectureTargets(r"(?:^|\.)h\.(\d+)\.", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")),
}


class UnsupportedArchitectureError(ValueError):
    """The model's type is not in :data:`ARCHITECTURES` and no modules were named by hand."""


@dataclass(frozen=True)
class TargetMatch:
    """A module picked for compression: its name, kind ("attention", "mlp" or "custom") and block index."""

    name: str
    kind: str
    block: int | None


def find_targets(module_names: list[str], model_type: str) -> list[TargetMatch]:
    """The attention and MLP matrices among ``module_names`` for this architecture, in model order."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is not in bondcut's architecture table (supported: "
            f"{', '.join(sorted(ARCHITECTURES))}). Name the modules by hand, e.g. "
            f"CompressConfig(modules=['model.layers.0.mlp.up_proj', ...]) or on the CLI "
            f"--modules 're:layers\\.\\d+\\.mlp\\.'"
        )
    targets = ARCHITECTURES[model_type]
    pattern = targets.pattern()
    found = []
    for name in module_names:
        match = pattern.search(name)
        if match:
            kind = "attention" if match.group(2) in targets.attention else "mlp"
            found.append(TargetMatch(name, kind, int(match.group(1))))
    if not found:
        raise UnsupportedArchitectureError(
            f"no attention/MLP matrices found for model_type '{model_type}' (looked for {pattern.pattern}); "
            "name the modules by hand with CompressConfig(modules=[...])"
        )
    return found


def targets_of(model) -> list[TargetMatch]:
    """The SA/MLP matrices of ``model`` by its architecture's table, whatever they are now (dense, MPO, packed):
    the table's names end in the matrix's own name, so submodules such as an MPO's cores never match."""
    return find_targets([name for name, _ in model.named_modules()], model.config.model_type)
