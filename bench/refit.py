"""Sequential refit of a compressed model: held-out perplexity before and after, with and without its dense layers.

    python bench/refit.py M70 --tokens 8192 --out bench/results/issue6/refit_m70.json [--save DIR]

Loads a compressed bondcut directory and the original, refits the compressed layers block by block to the
original's outputs on the inputs the compressed model gives them (:mod:`bondcut.refit`), and scores held-out
perplexity (Brown press, context 512, stride 256; the first --eval-tokens tokens, as `bondcut heal` scores) before
and after. The model is the same size after: same MPO layouts and bond dimensions.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import base_parser, environment, write_json

from bondcut import load, save
from bondcut.architectures import targets_of
from bondcut.perplexity import heldout_perplexity
from bondcut.refit import refit_sequential


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue6/refit.json")
    parser.add_argument("compressed", help="a compressed bondcut directory (no deleted blocks)")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens for the refit")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--dense", action="store_true", help="also refit the layers the compression kept dense")
    parser.add_argument("--save", type=Path, help="save the refit model here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.compressed)
    original, _ = load(args.model)
    names = [t.name for t in targets_of(original)]
    before = heldout_perplexity(model, tokenizer, args.eval_tokens).perplexity
    reference = heldout_perplexity(original, tokenizer, args.eval_tokens).perplexity
    start = time.perf_counter()
    refit = refit_sequential(model, original, tokenizer, names, tokens=args.tokens, dense=args.dense,
                             on_block=lambda done, total: print(f"block {done}/{total}", flush=True))  # fmt: skip
    seconds = time.perf_counter() - start
    after = heldout_perplexity(model, tokenizer, args.eval_tokens).perplexity
    if args.save:
        save(model, args.save, tokenizer)
    result = {
        "compressed": Path(args.compressed).name,
        "refit_tokens": args.tokens,
        "dense_refit": args.dense,
        "layers_refit": refit,
        "held_out": {"tokens": args.eval_tokens, "context": 512, "stride": 256},
        "original_perplexity": reference,
        "perplexity_before": before,
        "perplexity_after": after,
        "before_vs_original": before / reference,
        "after_vs_original": after / reference,
        "refit_seconds": seconds,
        "environment": environment(args.threads),
    }
    write_json(args.out, result)
    print(f"original {reference:.2f}; compressed {before:.2f} -> refit {after:.2f} ({refit} layers, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
