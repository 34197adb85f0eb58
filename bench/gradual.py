"""Compression in stages, healing after each, against one-shot compression then one heal of the same budget.

Takes a compressed model's plan (its ``bondcut_report.json``: every matrix's sites and chi) and reaches it in
``--stages`` steps from the original: at stage s each matrix the plan compresses keeps ``1 - (1 - f) * s / S`` of
its dense parameters (f: its final share; the last stage uses the plan's own chi, so the result has the plan's
exact size), decomposed activation-aware on the inputs of the current, healed model; then it heals on its share
of the token budget. The stages walk one seeded data order (``HealConfig.first_batch``), so the whole run sees
``--tokens`` distinct tokens once, like the one-shot heal it is compared with. Each stage's model is saved; a
rerun skips finished stages and resumes an interrupted heal from its checkpoint.

Run: ``python bench/gradual.py PLAN_DIR --work DIR [--tokens 1046016 --stages 2 --shares 0.4,0.6]``
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from _common import base_parser, environment, write_json

import bondcut
from bondcut import CompressConfig, HealConfig
from bondcut.mpo import chi_for_fraction
from bondcut.perplexity import heldout_perplexity
from bondcut.serialization import export_dense
from bondcut.surgery import break_even_chi


def final_plan(plan_dir: Path) -> tuple[dict[str, dict], str]:
    """The plan's compressed matrices ({name: entry}) and their one site family ('lowrank' or 2)."""
    layers = json.loads((plan_dir / "bondcut_report.json").read_text())["plan"]["layers"]
    compressed = {name: entry for name, entry in layers.items() if entry["layout"] != "dense"}
    families = {entry["layout"] for entry in compressed.values()}
    if len(families) != 1:
        raise SystemExit(f"the plan mixes layouts {sorted(families)}; this bench takes one family per run")
    return compressed, {"lowrank": "lowrank", "balanced": 2}[families.pop()]


def stage_chis(plan: dict[str, dict], stage: int, stages: int) -> dict[str, int]:
    """Chi of every matrix compressed at ``stage`` (1-based); matrices whose share is not below 1 stay dense."""
    if stage == stages:
        return {name: entry["chi"] for name, entry in plan.items()}
    chis = {}
    for name, entry in plan.items():
        share = 1 - (1 - entry["params"] / entry["dense_params"]) * stage / stages
        sites = tuple(tuple(s) for s in entry["sites"])
        chi = chi_for_fraction(sites, share)
        if break_even_chi(sites) > chi:  # saves something: compress now
            chis[name] = chi
    return chis


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue6/gradual.json")
    parser.add_argument("plan", type=Path, help="a compressed bondcut directory whose plan to reach")
    parser.add_argument("--work", type=Path, required=True, help="folder for each stage's model and checkpoint")
    parser.add_argument("--tokens", type=int, default=1046016, help="healing tokens over all stages (one pass)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--shares", default="0.4,0.6", help="share of --tokens per stage")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=64, help="steps between held-out checks in each stage")
    args = parser.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    if len(shares) != args.stages or abs(sum(shares) - 1) > 1e-6:
        raise SystemExit(f"--shares needs {args.stages} numbers summing to 1, got {shares}")
    torch.set_num_threads(args.threads)
    plan, sites = final_plan(args.plan)
    model, tokenizer = bondcut.load(args.model)
    per_step = args.batch_size * args.seq_len
    results = {"benchmark": "gradual", "plan": args.plan.name, "environment": environment(args.threads),
               "tokens": args.tokens, "stages": []}  # fmt: skip
    first_batch = 0
    for stage, share in enumerate(shares, start=1):
        done = args.work / f"stage{stage}"
        steps = round(share * args.tokens / per_step)
        heal_config = HealConfig(tokens=steps * per_step, seq_len=args.seq_len, batch_size=args.batch_size,
                                 micro_batch=args.micro_batch, lr=args.lr, train="mpo", checkpoint_every=16,
                                 eval_every=args.eval_every, first_batch=first_batch)  # fmt: skip
        first_batch += steps
        if (done / "stage.json").exists():
            model, tokenizer = bondcut.load(done)
            results["stages"].append(json.loads((done / "stage.json").read_text()))
            continue
        chis = stage_chis(plan, stage, args.stages)
        start = time.perf_counter()
        export_dense(model)  # each MPO layer back to the dense matrix it represents, to decompose at a smaller chi
        config = CompressConfig(chi=chis, include=list(chis), sites=sites, calibration_tokens=args.calib_tokens,
                                allocation="uniform")  # fmt: skip
        report = bondcut.compress(model, config, tokenizer=tokenizer)
        compress_s = time.perf_counter() - start
        kept = report.target_params_after / report.target_params_before
        print(f"stage {stage}: {len(chis)} matrices compressed, {kept:.3f} of their parameters kept", flush=True)
        healed = bondcut.heal(model, tokenizer, heal_config, checkpoint_dir=args.work / f"stage{stage}.checkpoint",
                              resume=True, on_step=lambda p: print(f"step {p['step']}/{p['steps']} loss {p['loss']:.3f}", flush=True))  # fmt: skip
        entry = {"stage": stage, "matrices_compressed": len(chis), "compress_s": compress_s,
                 "model_params": sum(p.numel() for p in model.parameters()), "first_batch": heal_config.first_batch,
                 "steps": healed.steps, "heal_s": healed.seconds, "evals": healed.evals}  # fmt: skip
        bondcut.save(model, done, tokenizer)
        (done / "stage.json").write_text(json.dumps(entry, indent=1))
        results["stages"].append(entry)
    results["model_params"] = sum(p.numel() for p in model.parameters())
    results["perplexity_4096"] = heldout_perplexity(model, tokenizer, max_tokens=4096).to_dict()
    results["perplexity_8192"] = heldout_perplexity(model, tokenizer, max_tokens=8192).to_dict()
    write_json(args.out, results)
    print(json.dumps({k: v for k, v in results.items() if k.startswith("perplexity")}), flush=True)


if __name__ == "__main__":
    main()
