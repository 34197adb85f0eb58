"""Exact evaluation of a packed model with each weight dequantized once per call vs once per evaluation.

Outside the CPU kernels (``compare`` scores quality on the exact path; int3/int2 and group-wise int8 have no
kernel) a packed layer dequantizes its weight on every forward call. ``bondcut.quant.dense_cache.dequantize_once``
(which ``perplexity``, ``generate_greedy`` and ``zero_shot`` open) keeps each dequantized weight for the evaluation.
This times both on the same model in one run: held-out perplexity (context 512, stride 256) and a 16-token greedy
generation, and checks that the figures are identical.

    python bench/dequantize_once.py Q4RE --out bench/results/issue7/dequantize_once.json
"""

from __future__ import annotations

import time

import torch
from _common import base_parser, environment, write_json

import bondcut
import bondcut.quant.modules as modules
from bondcut.evaluate import PROMPTS, generate_greedy
from bondcut.perplexity import heldout_perplexity
from bondcut.quant.kernels import packed_kernels


def timed(model, tokenizer, tokens: int) -> dict:
    """Seconds of the perplexity and of one generation, with what they gave."""
    began = time.perf_counter()
    ppl = heldout_perplexity(model, tokenizer, max_tokens=tokens)
    middle = time.perf_counter()
    text = generate_greedy(model, tokenizer, PROMPTS[:1], max_new_tokens=16)[PROMPTS[0]]
    return {"perplexity": ppl.perplexity, "perplexity_s": middle - began, "generation": text,
            "generation_s": time.perf_counter() - middle}  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue7/dequantize_once.json")
    parser.add_argument("packed", help="a saved packed model directory")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens for the perplexity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = bondcut.load(args.packed)
    model.eval()
    cached = modules.exact_weight
    results = {}
    with packed_kernels(False):
        modules.exact_weight = lambda module: module.weight_values()  # the per-call path this replaced
        try:
            results["per_call"] = timed(model, tokenizer, args.tokens)
        finally:
            modules.exact_weight = cached
        results["once"] = timed(model, tokenizer, args.tokens)
    per_call, once = results["per_call"], results["once"]
    assert per_call["perplexity"] == once["perplexity"] and per_call["generation"] == once["generation"]
    speedup = {k: per_call[k] / once[k] for k in ("perplexity_s", "generation_s")}
    print(results, speedup, flush=True)
    write_json(args.out, {"benchmark": "dequantize_once", "environment": environment(args.threads),
                          "model": args.packed, "tokens": args.tokens, "context": 512, "stride": 256,
                          "results": results, "speedup": speedup})  # fmt: skip


if __name__ == "__main__":
    main()
