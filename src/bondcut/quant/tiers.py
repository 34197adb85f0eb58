"""Row tiers: an embedding table packed at several widths, its most used rows finest.

A token's embedding row is read two ways: looked up when the token is an input, and (tied to the LM head)
multiplied into every position's logits, where a row's rounding error moves the distribution by about the
probability the model gives that token. Both are tiny for the many tokens a text rarely uses or predicts,
so a table spends its bytes best on the rows in use. ``RowTiers`` names the widths and the share of rows at
each, most used first ("8:0.1,4:0.9": the tenth of rows used most at 8 bits, the rest at 4); the rows are
ranked by :func:`row_usage` (how often each token occurs in the train split; ties by the probability the model
predicts for it). On SmolLM2-135M (tied 49,152 x 576 table alone packed, GPTQ rotated, groups of 64; KL on 4,096
unseen calibration tokens; bench/results/issue7/row_tiers.json): int4 0.0219 at 15.93 MB, "8:0.1,4:0.9" 0.0064 at
17.39 MB, "8:0.1,4:0.4,3:0.5" 0.0108 at 15.62 MB (the rarest half at 3 bits costs 0.004 and pays for the 8-bit tenth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .kernels import INT4_ROWS
from .packing import BITS, group_dividing, group_multiple, row_group

ROW_MULTIPLE = INT4_ROWS

DEFAULT_TIERS = ("8:0.1,4:0.4,3:0.5", "8:0.05,4:0.45,3:0.5", "8:0.1,4:0.9")
"""Row tiers the joint search offers a tied embedding unless told otherwise: on SmolLM2-135M's table (rotated GPTQ,
groups of 64) each lies below the bytes-vs-KL line of the plain widths (bench/results/issue7/row_tiers.json)."""


@dataclass(frozen=True)
class RowTiers:
    """(bits, share of rows) per tier, the most used rows' tier first; shares sum to 1."""

    tiers: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        example = "example: 8:0.1,4:0.9 (a tenth of the rows at 8 bits, the rest at 4)"
        if not self.tiers:
            raise ValueError(f"row tiers need at least one tier; {example}")
        for bits, share in self.tiers:
            if bits not in BITS:
                raise ValueError(f"row tier width must be one of {', '.join(map(str, BITS))}, got {bits!r}; {example}")
            if not 0 < share <= 1:
                raise ValueError(f"row tier share must be in (0, 1], got {share!r}; {example}")
        if abs(sum(s for _, s in self.tiers) - 1) > 1e-6:
            raise ValueError(f"row tier shares must sum to 1, got {sum(s for _, s in self.tiers):.4g}; {example}")

    @classmethod
    def parse(cls, text: str) -> RowTiers:
        """``"8:0.1,4:0.9"`` -> RowTiers(((8, 0.1), (4, 0.9)))."""
        try:
            tiers = tuple((int(b), float(s)) for b, s in (part.split(":") for part in text.split(",")))
        except ValueError as err:
            raise ValueError(f"row tiers look like 8:0.1,4:0.9 (bits:share, most used first), got {text!r}") from err
        return cls(tiers)

    def __str__(self) -> str:
        return ",".join(f"{b}:{s:g}" for b, s in self.tiers)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(b for b, _ in self.tiers)

    def fills_whole_bytes(self, group_sizes: tuple[int, ...]) -> bool:
        """Whether groups of each of ``group_sizes`` fill whole bytes at every tier's width."""
        return all(g % group_multiple(b) == 0 for b in self.widths for g in group_sizes)

    def counts(self, rows: int) -> list[int]:
        """Rows in each tier out of ``rows``: whole multiples of :data:`ROW_MULTIPLE` (the int4 CPU kernel's), the
        last tier taking the remainder."""
        counts, start = [], 0
        for _, share in self.tiers[:-1]:
            n = min(rows - start, ROW_MULTIPLE * round(share * rows / ROW_MULTIPLE))
            counts.append(n)
            start += n
        return [*counts, rows - start]

    def assign(self, usage: torch.Tensor) -> torch.Tensor:
        """(rows,) uint8 tier of each row: the most used rows (by ``usage``, ties by row number) in tier 0."""
        order = torch.argsort(usage.double(), descending=True, stable=True)
        tier_of = torch.empty(usage.numel(), dtype=torch.uint8)
        start = 0
        for tier, n in enumerate(self.counts(usage.numel())):
            tier_of[order[start : start + n]] = tier
            start += n
        return tier_of

    def nbytes(self, rows: int, width: int, group_size: int) -> int:
        """Bytes of a (rows x width) table packed so, in groups of ``group_size`` per row, with its tier index (one
        byte a row; none for a single tier, packed as a plain table)."""
        groups = {b: group_dividing(width, row_group(group_size, width), b) for b in self.widths}  # as packing cuts
        per_row = {b: width * b / 8 + 4 * (width // groups[b]) for b in self.widths}
        index = rows if len(self.tiers) > 1 else 0
        return index + sum(math.ceil(n * per_row[b]) for (b, _), n in zip(self.tiers, self.counts(rows)))


def parse_embedding_precision(text: str | int | None) -> int | RowTiers | None:
    """An embedding's packed precision as given on a command line or in a plan: a width (``4``), row tiers
    (``"8:0.1,4:0.9"``), or None (float)."""
    if text is None or isinstance(text, int | RowTiers):
        return text
    text = str(text)
    return RowTiers.parse(text) if ":" in text else int(text)


TIE_BREAK = 1e-6  # weight of the predicted probability: below one count in a million tokens, so it only orders ties


@torch.no_grad()
def row_usage(model: nn.Module, counted: torch.Tensor, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """(vocabulary,) how much each embedding row is used: the share of the token ids ``counted`` that are its
    token, ties (tokens the text never holds) ordered by the mean probability the model predicts for it on
    ``windows`` (a tied head's role; no order among ties for an untied table). ``batch`` windows per forward.
    Counts come from the most text at hand (the train split's 1.05 M tokens for :func:`corpus_usage`): a token
    the calibration text happens not to hold may still be common."""
    from ..divergence import next_token_logprobs

    rows = model.get_input_embeddings().weight.shape[0]
    counts = torch.bincount(counted.reshape(-1).long(), minlength=rows).double()
    usage = counts / counts.sum()
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        total, positions = torch.zeros(rows, dtype=torch.float64), 0
        for i in range(0, len(windows), batch):
            probs = next_token_logprobs(model, windows[i : i + batch]).exp().reshape(-1, rows)
            total += probs.sum(0, dtype=torch.float64)
            positions += probs.shape[0]
        usage += TIE_BREAK * total / positions
    return usage.float()


def corpus_usage(model: nn.Module, tokenizer, tokens: int = 1024) -> torch.Tensor:
    """:func:`row_usage` counted on the corpus's train split (the most text the project holds; tokenized once,
    cached) with ties ordered on ``tokens`` tokens of the calibration split."""
    from ..calibration import calibration_windows
    from ..train_data import split_token_ids

    counted = torch.from_numpy(split_token_ids(tokenizer, "train").astype("int64"))
    return row_usage(model, counted, calibration_windows(tokenizer, tokens, min(512, tokens)))


def tiered_values(tables: dict[int, torch.Tensor], tier_of: torch.Tensor, tiers: RowTiers) -> torch.Tensor:
    """The table a lookup reads once packed in tiers: row r from ``tables[bits of r's tier]`` (each the whole
    table rounded to that width; rows round independently, so picking rows equals rounding them alone)."""
    out = tables[tiers.widths[-1]].clone()
    for tier, bits in enumerate(tiers.widths[:-1]):
        rows = (tier_of == tier).nonzero().squeeze(1)
        out[rows] = tables[bits][rows]
    return out
