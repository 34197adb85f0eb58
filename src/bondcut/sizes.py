"""Size accounting: parameters and bytes, reported the way the field compares them."""

from __future__ import annotations

import os
from pathlib import Path


def directory_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) in a model directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin"))


def fp32_weight_bytes(model) -> int:
    """The model's weights in fp32, 4 bytes per parameter (a tied head counted once): what "x % smaller" is against."""
    return 4 * sum(p.numel() for p in model.parameters())


def percent_removed(before: int, after: int) -> float:
    return 100.0 * (1 - after / before) if before else 0.0
