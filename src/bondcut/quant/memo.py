"""One value derived from tensors, kept until one of them changes: the rounding of a trained weight (recomputed
after each optimizer step, shared by a step's micro-batches) and a packed weight's kernel layout (rebuilt when
``load_state_dict`` writes new codes in place)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class VersionMemo(Generic[T]):
    """Caches ``compute()`` under the tensors' storage, in-place version counter and shape."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: T | None = None

    def get(self, tensors: Sequence[torch.Tensor], compute: Callable[[], T]) -> T:
        key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)
        if self._key != key:
            self._value, self._key = compute(), key
        return self._value  # type: ignore[return-value]
