"""Held-out perplexity, size and forward time of the default model before and after ``compress``, one run.

Variants: the original, ``ratio=0.5`` with the default balanced MPO layout, and ``ratio=0.5, sites="lowrank"``
(the 2-site MPO (m x 1)(1 x n)). Perplexity: Brown held-out press files, ``--tokens`` tokens, context 512,
stride 512. No healing, no activation-aware decomposition (later stages), so this is the plain-algorithm floor.

Run: ``python bench/quality.py`` (~5 min on 2 cores). Writes bench/results/quality.json.
"""

from __future__ import annotations

import copy
import time

import torch
from _common import base_parser, environment, write_json

import bondcut
from bondcut.corpus import split_text
from bondcut.perplexity import perplexity


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], "quality.json")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    original, tokenizer = bondcut.load(args.model)
    text = split_text("heldout", genres="a")
    results = {
        "benchmark": "quality",
        "model": args.model,
        "ratio": args.ratio,
        "environment": environment(args.threads),
    }
    variants = {
        "original": None,
        "mpo_auto": bondcut.CompressConfig(ratio=args.ratio, allocation="uniform"),
        "mpo_lowrank": bondcut.CompressConfig(ratio=args.ratio, sites="lowrank", allocation="uniform"),
    }
    for name, config in variants.items():
        model = copy.deepcopy(original)
        entry: dict = {}
        if config is not None:
            report = bondcut.compress(model, config)
            entry.update(uniform_chi=report.uniform_chi, target_params=report.target_params_after)
        entry["model_params"] = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, text, context=512, stride=512, max_tokens=args.tokens)
        entry["perplexity"] = ppl.to_dict()
        entry["perplexity_seconds"] = time.perf_counter() - start
        results[name] = entry
        print(name, entry, flush=True)
        del model
    base = results["original"]
    for name in variants:
        results[name]["ppl_ratio_to_original"] = (
            results[name]["perplexity"]["perplexity"] / base["perplexity"]["perplexity"]
        )
        results[name]["time_ratio_to_original"] = results[name]["perplexity_seconds"] / base["perplexity_seconds"]
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
