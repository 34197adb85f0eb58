"""Timing helpers shared by ``bondcut bench`` and the scripts in bench/: statistics, environment, CPU noise."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .cache import atomic_write_text


def repeat_timings(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summarize(values: Sequence[float]) -> dict:
    """Median, min, max and count of a list of numbers (empty list -> count 0 only)."""
    if not values:
        return {"n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def environment(threads: int) -> dict:
    """What the numbers depend on: library versions, CPU, threads."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average_1_5_15min": list(os.getloadavg()),  # other processes on the cores skew timings
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class CpuContention:
    """Context manager measuring how much CPU other processes used while a timed section ran (Linux).

    ``other_share`` is the CPU time of everything but this process divided by (wall time x cores): 0 on an
    idle machine; above ~0.1 the timings of a 2-thread run are unreliable (threads wait for a busy core).
    """

    def __enter__(self):
        self._start = (self._busy_seconds(), sum(os.times()[:2]), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, wall0 = self._start
        busy, own, wall = self._busy_seconds() - busy0, sum(os.times()[:2]) - own0, time.perf_counter() - wall0
        other = float("nan") if math.isnan(busy) else max(busy - own, 0.0)
        self.result = {
            "wall_s": wall,
            "own_cpu_s": own,
            "other_cpu_s": other,
            "other_share": other / (wall * (os.cpu_count() or 1)),
        }

    @staticmethod
    def _busy_seconds() -> float:
        """Non-idle CPU seconds of all cores since boot from /proc/stat (nan where unavailable)."""
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON (via a .tmp file, so a killed run never leaves half a file)."""
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")
