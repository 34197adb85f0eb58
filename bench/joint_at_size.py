"""Joint search at a byte budget, before healing: held-out perplexity and the plan, written to OUT_DIR.json.

    python bench/joint_at_size.py BYTES OUT_DIR [--rounding gptq|rtn]

Issue 7 ran it at the int4 file size of SmolLM2-135M (75,858,056 bytes): bench/results/issue7/joint_at_int4_size.json.
"""

from __future__ import annotations

import argparse
import json
import time

import bondcut
from bondcut import CompressConfig
from bondcut.corpus import split_text
from bondcut.models import load_model
from bondcut.perplexity import perplexity
from bondcut.sizes import directory_weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target_bytes", type=int)
    parser.add_argument("out")
    parser.add_argument("--rounding", default="gptq", choices=("gptq", "rtn"))
    parser.add_argument("--max-deleted-blocks", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    start = time.time()
    config = CompressConfig(target_bytes=args.target_bytes, max_deleted_blocks=args.max_deleted_blocks,
                            joint_rounding=args.rounding)  # fmt: skip
    report = bondcut.compress(model, config, tokenizer=tokenizer)
    build_s = time.time() - start
    bondcut.save(model, args.out, tokenizer=tokenizer, overwrite=True)
    ppl = perplexity(model, tokenizer, split_text("heldout", genres="a"), context=512, stride=256, max_tokens=8192)
    result = {"target_bytes": args.target_bytes, "disk_bytes": directory_weight_bytes(args.out),
              "perplexity": ppl.to_dict(), "build_s": build_s, "rounding": args.rounding,
              "removed_blocks": report.joint["removed_blocks"], "embedding_bits": report.joint["embedding_bits"],
              "joint": report.joint}  # fmt: skip
    with open(args.out.rstrip("/") + ".json", "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(json.dumps({k: v for k, v in result.items() if k != "joint"}, indent=1, default=str))


if __name__ == "__main__":
    main()
