"""Held-out perplexity across every genre, for comparisons too close for the 8,191-token press figure.

The usual figure scores the first 8,192 tokens of the held-out press reportage (5 files). Two models a fraction of
a percent apart there are within its noise; this scores the first ``--tokens-per-file`` tokens of each of the 54
held-out files (every genre of the Brown corpus), context 512, stride 256, pooled over all scored tokens, and gives
each pair of models the paired difference of their per-file NLLs (mean ± standard error over files).

Run: ``python bench/wide_heldout.py DIR_A DIR_B ... --out bench/results/issueN/NAME.json`` (~4 min per model on
2 cores at 1,024 tokens per file).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from pathlib import Path

import torch
from _common import base_parser, environment, write_json

import bondcut
from bondcut.corpus import load_split, split_files
from bondcut.perplexity import HELDOUT_CONTEXT, HELDOUT_STRIDE, perplexity


def per_file_nll(model, tokenizer, documents: list[str], tokens_per_file: int) -> list[tuple[float, int]]:
    """(mean NLL, tokens scored) of each document's first ``tokens_per_file`` tokens."""
    out = []
    for text in documents:
        result = perplexity(model, tokenizer, text, HELDOUT_CONTEXT, HELDOUT_STRIDE, max_tokens=tokens_per_file)
        out.append((result.nll, result.tokens_scored))
    return out


def pooled(nlls: list[tuple[float, int]]) -> dict:
    """Perplexity over every scored token of every file."""
    tokens = sum(n for _, n in nlls)
    nll = sum(v * n for v, n in nlls) / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens_scored": tokens}


def paired(a: list[tuple[float, int]], b: list[tuple[float, int]]) -> dict:
    """a − b per file (nats/token): mean, standard error over files, and how many files a is lower on."""
    diffs = [x - y for (x, _), (y, _) in zip(a, b, strict=True)]
    return {"mean_nats": statistics.mean(diffs), "stderr_nats": statistics.stdev(diffs) / math.sqrt(len(diffs)),
            "files_lower": sum(d < 0 for d in diffs), "files": len(diffs)}  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "wide_heldout.json")
    parser.add_argument("models", nargs="+", help="model directories or aliases")
    parser.add_argument("--tokens-per-file", type=int, default=1024, help="first N tokens of each held-out file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [Path(path).name for path in args.models]  # each directory's own name: no machine paths in the results
    if len(set(names)) < len(names):
        parser.error(f"models need distinct directory names to be told apart in the results, got {names}")
    files, documents = split_files("heldout"), load_split("heldout")
    results = {"benchmark": "wide_heldout", "environment": environment(args.threads), "files": len(files),
               "tokens_per_file": args.tokens_per_file, "context": HELDOUT_CONTEXT, "stride": HELDOUT_STRIDE,
               "models": {}, "paired": {}}  # fmt: skip
    per_file = {}
    for path, name in zip(args.models, names, strict=True):
        start = time.perf_counter()
        model, tokenizer = bondcut.load(path)
        with torch.no_grad():
            per_file[name] = per_file_nll(model, tokenizer, documents, args.tokens_per_file)
        results["models"][name] = {**pooled(per_file[name]), "seconds": time.perf_counter() - start,
                                   "per_file_nll": dict(zip(files, (v for v, _ in per_file[name]), strict=True))}  # fmt: skip
        print(f"{name}: {results['models'][name]['perplexity']:.3f} on {results['models'][name]['tokens_scored']:,} "
              f"tokens ({results['models'][name]['seconds']:.0f} s)", flush=True)  # fmt: skip
        del model
        for a, b in itertools.combinations(per_file, 2):
            results["paired"][f"{a} - {b}"] = paired(per_file[a], per_file[b])
        write_json(args.out, results)  # after each model: a stopped run keeps what it scored
    for pair, stats in results["paired"].items():
        print(f"{pair}: {stats['mean_nats']:+.4f} ± {stats['stderr_nats']:.4f} nats/token, "
              f"lower on {stats['files_lower']} of {stats['files']} files")  # fmt: skip


if __name__ == "__main__":
    main()
