"""Helpers shared by the benchmark scripts: summary statistics, environment record, JSON output."""

from __future__ import annotations

from pathlib import Path

from bondcut.timing import CpuContention, environment, summarize, write_json  # noqa: F401  (re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# nn.Linear name suffix -> short module type, in the order used in tables and plots
MODULE_TYPES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


def module_type(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'up'; the raw last component if it is not in MODULE_TYPES."""
    last = name.rsplit(".", 1)[-1]
    return MODULE_TYPES.get(last, last)


def base_parser(description: str, out_name: str):
    """An argparse parser with the options every benchmark takes: --model, --threads, --out."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m", help="alias or HF directory (default: smollm2-135m)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / out_name, help="JSON path; a PNG goes beside it")
    return parser
