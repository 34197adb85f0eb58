"""LayerChop, the structural baseline: delete whole decoder blocks, then continue pretraining (``heal``).

Which blocks go: ``rule="deepest"`` is the LayerChop paper's (the deepest blocks, keeping the last one);
``rule="measured"`` removes, greedily one at a time, the block whose removal raises the KL divergence to the
original least on calibration tokens (blocks before the candidate are replayed, :class:`BlockReplay`). The
first step scores every block; later steps rescore only the ``shortlist`` blocks that scored best alone,
since removals interact but rarely reorder the far tail.
The chopped model is an ordinary transformers model with fewer layers: it saves and reloads as such.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from .architectures import targets_of
from .calibration import calibration_windows
from .replay import BlockReplay, block_list, copy_block_attributes

RULES = ("measured", "deepest")


@dataclass
class ChopReport:
    """Which blocks were removed (original indices, in removal order) and each one's KL when it went."""

    removed: list[int]
    kl: list[float]
    rule: str
    blocks_before: int
    params_before: int
    params_after: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Skip(nn.Module):
    """Stand-in for a removed block while measuring: hands its input through unchanged."""

    def __init__(self, block: nn.Module, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple
        copy_block_attributes(block, self)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


def _blocks(model: nn.Module) -> tuple[nn.ModuleList, list[str]]:
    names = [t.name for t in targets_of(model)]
    return block_list(model, names)[0], names


def blocks_to_remove(n_blocks: int, fraction: float) -> int:
    """How many of ``n_blocks`` blocks to delete to remove ``fraction`` of the block parameters."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction of block parameters to remove must be in (0, 1), got {fraction}")
    count = round(fraction * n_blocks)
    if not 0 < count < n_blocks:
        raise ValueError(f"removing {fraction:.0%} of {n_blocks} blocks leaves {n_blocks - count}: nothing to chop")
    return count


def choose_blocks(
    model: nn.Module,
    tokenizer,
    count: int,
    rule: str = "measured",
    calibration_tokens: int = 1024,
    context: int = 512,
    shortlist: int = 8,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[list[int], list[float]]:
    """The ``count`` blocks to delete, with the KL to the original after each removal (NaN for ``deepest``)."""
    blocks, names = _blocks(model)
    n = len(blocks)
    if rule == "deepest":
        return list(range(n - 1 - count, n - 1)), [float("nan")] * count
    if rule != "measured":
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    runner = BlockReplay(model, calibration_windows(tokenizer, calibration_tokens, context), names)
    runner.record(as_reference=True)
    returns_tuple = isinstance(runner.outputs[0][0], tuple)
    originals = list(blocks)
    removed: list[int] = []
    kls: list[float] = []
    alone: dict[int, float] = {}
    try:
        for step in range(count):
            runner.record()  # outputs of the current (already chopped) model, for replay
            candidates = range(n) if not alone else sorted(alone, key=alone.get)[: shortlist + step]
            best, best_kl = -1, float("inf")
            for index in (i for i in candidates if i not in removed):
                blocks[index] = _Skip(originals[index], returns_tuple)
                kl = runner.score(first_block=index).kl
                blocks[index] = originals[index]
                if step == 0:
                    alone[index] = kl
                if kl < best_kl:
                    best, best_kl = index, kl
            removed.append(best)
            kls.append(best_kl)
            blocks[best] = _Skip(originals[best], returns_tuple)
            if on_step:
                on_step(step + 1, count)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return removed, kls


def remove_blocks(model: nn.Module, removed: Sequence[int]) -> None:
    """Delete the blocks ``removed`` (indices) in place and renumber the rest (layer_idx, config.layer_types)."""
    blocks, _ = _blocks(model)
    gone = set(removed)
    if not gone or min(gone) < 0 or max(gone) >= len(blocks):
        raise ValueError(f"block indices must lie in [0, {len(blocks)}), got {sorted(gone)}")
    kept = [i for i in range(len(blocks)) if i not in gone]
    new_blocks = [blocks[i] for i in kept]
    for new_index, block in enumerate(new_blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    from .surgery import name_of, set_submodule

    set_submodule(model, name_of(model, blocks), nn.ModuleList(new_blocks))
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.num_hidden_layers = len(kept)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in kept]


def names_after_removal(model: nn.Module, names: Sequence[str], removed: Sequence[int]) -> dict[str, str | None]:
    """Module names as :func:`remove_blocks` will renumber them: old -> new (None for those in removed blocks)."""
    from .surgery import name_of

    blocks, _ = _blocks(model)
    prefix = name_of(model, blocks) + "."
    kept = [i for i in range(len(blocks)) if i not in set(removed)]
    new_index = {old: new for new, old in enumerate(kept)}  # the order remove_blocks keeps them in
    renamed = {}
    for name in names:
        if not name.startswith(prefix):
            renamed[name] = name
            continue
        index, _, rest = name[len(prefix) :].partition(".")
        moved = new_index.get(int(index))
        renamed[name] = None if moved is None else f"{prefix}{moved}" + (f".{rest}" if rest else "")
    return renamed


def chop(
    model: nn.Module,
    tokenizer,
    fraction: float,
    rule: str = "measured",
    calibration_tokens: int = 1024,
    on_step: Callable[[int, int], None] | None = None,
) -> ChopReport:
    """Delete ``fraction`` of the decoder blocks (by ``rule``) in place; the report names them."""
    blocks, _ = _blocks(model)
    n_before = len(blocks)
    params_before = sum(p.numel() for p in model.parameters())
    removed, kls = choose_blocks(model, tokenizer, blocks_to_remove(n_before, fraction), rule, calibration_tokens,
                                 on_step=on_step)  # fmt: skip
    remove_blocks(model, removed)
    return ChopReport(removed, kls, rule, n_before, params_before, sum(p.numel() for p in model.parameters()))
