"""The teacher's top-k logits, cached on disk per training sequence, so distillation runs the teacher once.

Healing with distillation normally runs the original model beside the student on every batch. With a cache, the
first run that meets a sequence computes its teacher logits and keeps the k largest per position (fp16 values and
their token ids); every later run on the same data (another learning rate, another compressed model, a resumed
run) reads them and never runs the teacher. The distillation term then compares the student with the teacher's
distribution renormalized over those k tokens (``sparse_distillation_loss``).

The cache is keyed by the teacher's weights, the token sequences and k; it lives under ``cache_dir()/teacher``.
Each sequence's row is written before its "filled" flag, and both files are flushed, so a killed run leaves at
worst unflagged rows that are recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache import cache_dir
from .divergence import kl_per_position


def teacher_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter's name, shape and leading values: names the weights, not the object."""
    digest = hashlib.sha1(str(getattr(getattr(model, "config", None), "model_type", "")).encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(param.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class TeacherCache:
    """Top-k teacher logits for each of ``sequences`` (n, seq_len), filled on first use."""

    def __init__(self, teacher: nn.Module, sequences: torch.Tensor, k: int, root: Path | None = None) -> None:
        vocab = int(teacher.get_output_embeddings().weight.shape[0])
        if not 1 <= k <= vocab:
            raise ValueError(f"teacher top-k must be between 1 and the vocabulary size {vocab}, got {k}")
        self.teacher, self.k = teacher, k
        key = hashlib.sha1(teacher_fingerprint(teacher).encode() + sequences.numpy().tobytes() + str(k).encode())
        self.directory = (root or cache_dir() / "teacher") / key.hexdigest()[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        n, seq_len = sequences.shape
        index_type = np.uint16 if vocab <= 2**16 else np.int32
        self.values = self._open("values.npy", np.float16, (n, seq_len, k))
        self.indices = self._open("indices.npy", index_type, (n, seq_len, k))
        self.filled = self._open("filled.npy", np.bool_, (n,))
        meta = self.directory / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps({"sequences": n, "seq_len": seq_len, "k": k, "vocab": vocab}))
        self.teacher_calls = 0

    def _open(self, name: str, dtype, shape: tuple[int, ...]) -> np.memmap:
        """A .npy memory map, created (sparse, zero) the first time; rows are written in place."""
        path = self.directory / name
        if path.exists():
            return np.load(path, mmap_mode="r+")
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def top_logits(self, rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values float32, token ids int64), each (len(rows), seq_len, k), for sequences ``rows`` holding ``ids``.

        Rows not yet cached are computed with the teacher now and stored; what is returned always comes from
        the stored fp16 values, so a run that fills the cache and a run that reads it see the same numbers.
        """
        rows_np = rows.cpu().numpy()
        missing = ~self.filled[rows_np]
        if missing.any():
            self.teacher_calls += 1
            device = next(self.teacher.parameters()).device
            with torch.no_grad():
                logits = self.teacher(input_ids=ids[torch.from_numpy(missing)].to(device), use_cache=False).logits
            top = logits.float().topk(self.k, dim=-1)
            todo = rows_np[missing]
            self.values[todo] = top.values.cpu().numpy().astype(np.float16)
            self.indices[todo] = top.indices.cpu().numpy().astype(self.indices.dtype)
            self.values.flush()
            self.indices.flush()
            self.filled[todo] = True
            self.filled.flush()
        values = torch.from_numpy(np.asarray(self.values[rows_np], dtype=np.float32))
        indices = torch.from_numpy(np.asarray(self.indices[rows_np]).astype(np.int64))
        return values, indices


def sparse_distillation_loss(
    student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher_T restricted to its top k || student_T), mean over positions.

    The teacher's distribution is renormalized over its k tokens; the student's log-probabilities are over the
    whole vocabulary, read at those tokens. With k = vocabulary this is ``heal.distillation_loss`` exactly.
    """
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, top_indices)
    teacher = F.log_softmax(top_values.float() / t, dim=-1)
    return t * t * kl_per_position(teacher, student).mean()
