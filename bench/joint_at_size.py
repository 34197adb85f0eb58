"""Joint search at a byte budget: held-out perplexity packed before healing and, with --heal-tokens, after
healing the float structure (MPO cores, blocks deleted; its perplexity too) and packing it then; writes
OUT_DIR.json.

    python bench/joint_at_size.py BYTES OUT_DIR [--rounding gptq|rtn] [--heal-tokens N] [--heal-train mpo|all]
        [--scale-heal-tokens N] [--checkpoint-dir DIR]

--scale-heal-tokens heals the packed model afterwards (its group scales and offsets; codes fixed).
--checkpoint-dir keeps both healings' checkpoints there (every 16 steps); run the same command again to resume
(the search is deterministic, so it rebuilds the same model first).

Issue 7 ran it at the int4 file size of SmolLM2-135M (75,858,056 bytes, before healing:
bench/results/issue7/joint_at_int4_size.json) and at 10 % of the fp32 file (53,809,040 bytes, healed:
bench/results/issue7/joint_at_10pct.json) and 12 % (64,570,849 bytes, healed: joint_at_12pct.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import bondcut
from bondcut import CompressConfig, HealConfig
from bondcut.joint import apply_pending_packing
from bondcut.models import load_model
from bondcut.perplexity import heldout_perplexity
from bondcut.sizes import directory_weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target_bytes", type=int)
    parser.add_argument("out")
    parser.add_argument("--rounding", default="gptq", choices=("gptq", "rtn"))
    parser.add_argument("--max-deleted-blocks", type=int, default=4)
    parser.add_argument("--heal-tokens", type=int, default=0, help="0: pack at once, no healing")
    parser.add_argument("--heal-lr", type=float, default=2e-4)
    parser.add_argument(
        "--scale-heal-tokens",
        type=int,
        default=0,
        help="after packing: tokens of healing the packed model's group scales and offsets",
    )
    parser.add_argument("--scale-heal-lr", type=float, default=3e-4)
    parser.add_argument(
        "--heal-train",
        default="mpo",
        choices=("mpo", "all"),
        help="what healing trains: the MPO cores only, or every float parameter",
    )
    parser.add_argument("--checkpoint-dir", default=None, help="checkpoint both healings here; rerun to resume")
    args = parser.parse_args()
    checkpoints = {} if args.checkpoint_dir is None else {"checkpoint_every": 16}

    def checkpoint_of(stage: str) -> dict:
        """heal()'s keyword arguments to checkpoint ``stage`` and resume it from an earlier run."""
        return {} if args.checkpoint_dir is None else {"checkpoint_dir": f"{args.checkpoint_dir}/{stage}",
                                                         "resume": True}  # fmt: skip

    model, tokenizer = load_model("smollm2-135m")
    start = time.time()
    config = CompressConfig(target_bytes=args.target_bytes, max_deleted_blocks=args.max_deleted_blocks,
                            joint_rounding=args.rounding, defer_packing=True)  # fmt: skip
    report = bondcut.compress(model, config, tokenizer=tokenizer)
    build_s = time.time() - start
    unhealed = copy.deepcopy(model) if args.heal_tokens else model  # without healing: pack the model itself, once
    apply_pending_packing(unhealed, tokenizer)
    result = {"target_bytes": args.target_bytes, "rounding": args.rounding, "build_s": build_s,
              "heal_train": args.heal_train,
              "perplexity_before_heal": heldout_perplexity(unhealed, tokenizer).to_dict()}  # fmt: skip
    del unhealed
    print(json.dumps(result, indent=1), flush=True)
    result["perplexity"] = result["perplexity_before_heal"]
    if args.heal_tokens:
        start = time.time()
        heal_config = HealConfig(tokens=args.heal_tokens, lr=args.heal_lr, train=args.heal_train, eval_tokens=1024,
                                 **checkpoints)  # fmt: skip
        healed = bondcut.heal(model, tokenizer, heal_config, **checkpoint_of("float"))
        result.update(heal_s=time.time() - start, heal=healed.to_dict())
        result["perplexity_healed_float"] = heldout_perplexity(model, tokenizer).to_dict()  # what packing then costs
        apply_pending_packing(model, tokenizer)
        result["perplexity"] = heldout_perplexity(model, tokenizer).to_dict()
    if args.scale_heal_tokens:  # the model is packed by now (healed or not)
        result["perplexity_packed"] = result["perplexity"]
        start = time.time()
        scale_config = HealConfig(tokens=args.scale_heal_tokens, lr=args.scale_heal_lr, train="scales",
                                  eval_tokens=1024, **checkpoints)  # fmt: skip
        scale_healed = bondcut.heal(model, tokenizer, scale_config, **checkpoint_of("scales"))
        result.update(scale_heal_s=time.time() - start, scale_heal=scale_healed.to_dict())
        result["perplexity"] = heldout_perplexity(model, tokenizer).to_dict()
    bondcut.save(model, args.out, tokenizer=tokenizer, overwrite=True)
    result.update(disk_bytes=directory_weight_bytes(args.out), removed_blocks=report.joint["removed_blocks"],
                  embedding_bits=report.joint["embedding_bits"], joint=report.joint, plan=report.plan)  # fmt: skip
    with open(args.out.rstrip("/") + ".json", "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    summary = {k: v for k, v in result.items() if k not in ("joint", "plan", "heal", "scale_heal")}
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
