"""Training batches from the corpus's train split: tokenized once (cached), cut into sequences, fixed order.

The order of sequences is a seeded permutation, and the batch of optimizer step ``s`` is a pure function of
``s``: a resumed run sees exactly the batches an uninterrupted one would, and ``R`` processes each take every
R-th sequence of the same global batch (so one process and several see the same data per step).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .cache import cache_dir


def split_token_ids(tokenizer, split: str = "train") -> np.ndarray:
    """All token ids of ``split`` (documents joined by blank lines), int32, cached per tokenizer and split."""
    from .corpus import split_text

    text = split_text(split)
    probe = np.asarray(tokenizer(text[:4096]).input_ids, dtype=np.int32)  # the tokenizer, told by what it does
    key = hashlib.sha1(f"{type(tokenizer).__name__}{len(tokenizer)}".encode() + probe.tobytes())
    path = cache_dir() / "tokens" / f"{split}-{key.hexdigest()[:12]}-{len(text)}.npy"
    if path.exists():
        return np.load(path)
    ids = np.asarray(tokenizer(text).input_ids, dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as handle:  # np.save on a path would append .npy to the temp name
        np.save(handle, ids)
    tmp.replace(path)
    return ids


class SequenceStream:
    """Fixed-length sequences of a token array in a seeded order; ``batch(step)`` is deterministic."""

    def __init__(self, ids: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, first_batch: int = 0) -> None:
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        self.sequences = torch.from_numpy(ids[: len(ids) // seq_len * seq_len].astype(np.int64)).reshape(-1, seq_len)
        if len(self.sequences) < batch_size:
            raise ValueError(f"the text has {len(self.sequences)} sequences of {seq_len} tokens, fewer than a batch "
                             f"of {batch_size}; lower --seq-len or --batch-size")  # fmt: skip
        self.batch_size, self.seed, self.first_batch = batch_size, seed, first_batch

    @property
    def tokens_per_pass(self) -> int:
        """Tokens in one pass over the split (one epoch)."""
        return self.sequences.numel()

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.sequences), generator=generator)

    def rows(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Indices into ``sequences`` of this process's part of step ``step``'s global batch: every world-th.
        Step 0 is batch ``first_batch`` of the seeded order."""
        if self.batch_size % world:
            raise ValueError(f"batch size {self.batch_size} does not split over {world} processes")
        per_epoch = len(self.sequences) // self.batch_size
        epoch, offset = divmod(step + self.first_batch, per_epoch)
        return self._order(epoch)[offset * self.batch_size : (offset + 1) * self.batch_size][rank::world]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Rows ``rank, rank + world, ...`` of step ``step``'s global batch: (batch_size // world, seq_len)."""
        return self.sequences[self.rows(step, rank, world)]
