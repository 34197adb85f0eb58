"""Run a model from block b onward on cached block outputs, so changing block b costs only blocks b..N.

GPTQ-style: one full pass records what every decoder block returned on each calibration window; afterwards
the blocks before b are replaced by stand-ins that return those recordings, and the model's own forward runs
the rest (its embedding, masks and rotary tables are cheap, the skipped blocks are not). The model needs no
tracing and no per-architecture code beyond where its block list lives. Used by the profile (one matrix
changed at a time) and by the allocation search (a few matrices changed against a parent).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .divergence import kl_per_position, token_nll


@dataclass(frozen=True)
class Score:
    """Mean next-token NLL and mean KL(reference || model) per token, in nats (kl is 0 without a reference)."""

    loss: float
    kl: float

    def value(self, objective: str) -> float:
        """What a search minimizes: ``"kl"`` (to the original) or ``"nll"`` (of the text: log perplexity; one of
        :data:`bondcut.config.OBJECTIVES`, checked by :func:`bondcut.config.check_objective`)."""
        return self.kl if objective == "kl" else self.loss


def block_list(model: nn.Module, target_names: Sequence[str]) -> tuple[nn.ModuleList, re.Pattern]:
    """The outermost ModuleList of numbered blocks holding ``target_names`` (e.g. ``model.layers``), and its index regex."""
    for prefix, module in sorted(model.named_modules(), key=lambda item: len(item[0])):
        if prefix and isinstance(module, nn.ModuleList):
            pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
            if any(pattern.match(name) for name in target_names):
                return module, pattern
    raise ValueError(f"no decoder block list (an nn.ModuleList of numbered blocks) holds {list(target_names)[:3]}")


def copy_block_attributes(block: nn.Module, stand_in: nn.Module) -> None:
    """Give a block's stand-in the attributes some models' layer loops read from their blocks."""
    for attr in ("attention_type", "layer_idx", "is_sliding"):
        if hasattr(block, attr):
            setattr(stand_in, attr, getattr(block, attr))


class RecordedBlock(nn.Module):
    """Stand-in for a skipped block: returns what the real block returned on the current window (``runner.window``)."""

    def __init__(self, block: nn.Module, outputs: list, runner: BlockReplay) -> None:
        super().__init__()
        self.outputs, self.runner = outputs, runner
        copy_block_attributes(block, self)

    def forward(self, *args, **kwargs):
        return self.outputs[self.runner.window]


class BlockReplay:
    """Loss and KL to a reference of ``model`` on ``windows`` (rows of token ids), rerunning from a given block.

    ``record()`` runs the whole model and stores every block's output (with ``as_reference``, also its
    next-token distributions, against which later scores measure the KL divergence: the low-noise measure
    EvoPress uses, where the loss difference on a few hundred tokens is mostly noise); ``score(first_block)``
    then reruns from ``first_block``, whose predecessors must be unchanged since the recording.
    Memory: blocks x tokens x hidden, plus tokens x vocab for the reference.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, target_names: Sequence[str]) -> None:
        self.model, self.windows = model, windows
        self.blocks, self._index = block_list(model, target_names)
        self.outputs: list[list] = [[] for _ in self.blocks]
        self.reference: list[torch.Tensor] = []  # per window: (tokens, vocab) log-probabilities
        self.window = 0

    def block_of(self, name: str) -> int:
        """Index of the block that module ``name`` lives in (0 for modules outside the blocks: rerun all)."""
        match = self._index.match(name)
        return int(match.group(1)) if match else 0

    def record(self, as_reference: bool = False) -> Score:
        """Full pass: the score, with every block's output (and, ``as_reference``, the distributions) stored."""
        self.outputs = [[] for _ in self.blocks]
        if as_reference:
            self.reference = []

        def keep(index: int):
            def hook(module, args, output) -> None:
                self.outputs[index].append(output)

            return hook

        handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(self.blocks)]
        try:
            return self._score(keep_reference=as_reference)
        finally:
            for handle in handles:
                handle.remove()

    def score(self, first_block: int = 0) -> Score:
        """The score with blocks ``< first_block`` replayed from the last :meth:`record`."""
        if first_block > 0 and not self.outputs[0]:
            raise RuntimeError("BlockReplay.score(first_block > 0) needs record() first")
        originals = list(self.blocks[:first_block])
        for i in range(first_block):
            self.blocks[i] = RecordedBlock(originals[i], self.outputs[i], self)
        try:
            return self._score()
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    def _score(self, keep_reference: bool = False) -> Score:
        loss = kl = 0.0
        with torch.no_grad():
            for self.window, ids in enumerate(self.windows):
                logits = self.model(ids[None], use_cache=False).logits[0, :-1].float()  # (T-1, vocab)
                logp = torch.log_softmax(logits, dim=-1)
                loss += float(token_nll(logp, ids).mean())
                if keep_reference:
                    self.reference.append(logp)
                elif self.reference:
                    ref = self.reference[self.window]
                    kl += float(kl_per_position(ref, logp).mean())
        return Score(loss / len(self.windows), kl / len(self.windows))
