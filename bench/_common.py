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


def add_tied_table_arguments(parser) -> None:
    """The options of the benches that pack a tied embedding and measure its KL: --tokens, --gram-tokens."""
    parser.add_argument("--tokens", type=int, default=4096, help="unseen calibration tokens the KL is measured on")
    parser.add_argument("--gram-tokens", type=int, default=16384, help="calibration tokens for the head's statistics")


def load_tied_table(args):
    """(model, tokenizer, the tied head's input Gram matrix, unseen calibration windows of ``args.tokens``) for a
    bench that packs a tied embedding; exits with a clear message for a model whose head is not tied."""
    import torch

    from bondcut.calibration import unseen_calibration_windows
    from bondcut.joint import tied_head_gram
    from bondcut.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    gram = tied_head_gram(model, tokenizer, args.gram_tokens)
    if gram is None:
        raise SystemExit(f"{args.model} does not tie its embedding to the LM head: this bench measures a tied table")
    return model, tokenizer, gram, unseen_calibration_windows(tokenizer, args.tokens, 512)
