"""Held-out perplexity at 50 % of SA+MLP parameters (uniform chi): plain vs activation-aware TT-SVD, one run.

Perplexity: Brown held-out press, 8,192 tokens, context 512, stride 256. Calibration: 16,384 tokens of the
calibration split. Run: ``python bench/activation_aware_ppl.py`` (~4 min on 2 cores).
Writes bench/results/issue5/activation_aware_ppl.json.
"""

from __future__ import annotations

import copy
import time

import torch
from _common import RESULTS_DIR, environment, write_json

import bondcut
from bondcut.perplexity import heldout_perplexity

VARIANTS = {
    "lowrank_plain": bondcut.CompressConfig(ratio=0.5, sites="lowrank", allocation="uniform"),
    "lowrank_aware": bondcut.CompressConfig(ratio=0.5, sites="lowrank", calibration_tokens=16384, allocation="uniform"),
    "balanced_aware": bondcut.CompressConfig(ratio=0.5, calibration_tokens=16384, allocation="uniform"),
}


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = bondcut.load("smollm2-135m")
    results = {"benchmark": "activation_aware_ppl", "environment": environment(2)}
    for name, config in VARIANTS.items():
        compressed = copy.deepcopy(model)
        start = time.perf_counter()
        report = bondcut.compress(compressed, config, tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        bondcut.tune(compressed, allow_dense=True)  # exact; only makes the balanced model evaluable quickly
        ppl = heldout_perplexity(compressed, tokenizer)
        results[name] = {"ppl": ppl.perplexity, "tokens": ppl.tokens_scored, "compress_s": seconds,
                         "kept": report.target_params_after / report.target_params_before}  # fmt: skip
        print(name, results[name], flush=True)
    write_json(RESULTS_DIR / "issue5" / "activation_aware_ppl.json", results)


if __name__ == "__main__":
    main()
