"""Held-out perplexity before healing at 30 %, 50 % and 70 % fewer SA+MLP parameters: bondcut vs its peers, one run.

Variants (all at the same kept fraction of the SA+MLP weights):
- ``svd``: truncated SVD, one uniform rank (plain low rank);
- ``mpo_plain``: plain TT-SVD MPO, uniform chi, default balanced layout (CompactifAI's algorithm);
- ``svdllm``: activation-aware low rank, uniform rank (SVD-LLM's whitening; 16,384 calibration tokens);
- ``bondcut_nosearch``: profile allocation over layouts and chi + activation-aware (50 % only, an ablation);
- ``bondcut``: the same plus a 48-evaluation search (``bondcut compress --ratio R --search 48``).

Perplexity: Brown held-out press, 8,192 tokens, context 512, stride 256. Run: ``python bench/allocation.py``
(~35 min on 2 cores). Writes bench/results/issue5/allocation.json and allocation.png.
"""

from __future__ import annotations

import copy
import time

import torch
from _common import base_parser, environment, write_json

import bondcut
from bondcut.perplexity import heldout_perplexity


def variants(ratio: float) -> dict[str, bondcut.CompressConfig]:
    uniform = {"ratio": ratio, "allocation": "uniform"}
    out = {
        "svd": bondcut.CompressConfig(**uniform, sites="lowrank", calibration_tokens=0),
        "mpo_plain": bondcut.CompressConfig(**uniform, calibration_tokens=0),
        "svdllm": bondcut.CompressConfig(**uniform, sites="lowrank", calibration_tokens=16384),
        "bondcut": bondcut.CompressConfig(ratio=ratio, search_evaluations=48),
    }
    if ratio == 0.5:
        out["bondcut_nosearch"] = bondcut.CompressConfig(ratio=ratio)
    return out


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bondcut.report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    names = ["svd", "mpo_plain", "svdllm", "bondcut"]
    removed = sorted(results["runs"], key=float)
    for offset, name in enumerate(names):
        ppl = [results["runs"][r][name]["ppl"] for r in removed]
        xs = [i + (offset - 1.5) * 0.2 for i in range(len(removed))]
        ax.bar(xs, ppl, width=0.2, label=name)
    ax.axhline(results["original"]["ppl"], color="k", linestyle="--", label="original")
    ax.set_yscale("log")
    ax.set_xticks(range(len(removed)), [f"{float(r):.0%} removed" for r in removed])
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M before healing, equal SA+MLP parameters")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue5/allocation.json")
    parser.add_argument("--removed", default="0.3,0.5,0.7", help="fractions of SA+MLP parameters removed")
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = bondcut.load(args.model)

    def ppl(m) -> dict:
        return heldout_perplexity(m, tokenizer).to_dict()

    results = {"benchmark": "allocation", "environment": environment(args.threads), "original": ppl(model), "runs": {}}
    results["original"]["ppl"] = results["original"]["perplexity"]
    only = {v for v in args.only.split(",") if v}
    for removed in (float(r) for r in args.removed.split(",")):
        for name, config in variants(round(1 - removed, 4)).items():
            if only and name not in only:
                continue
            compressed = copy.deepcopy(model)
            start = time.perf_counter()
            report = bondcut.compress(compressed, config, tokenizer=tokenizer)
            seconds = time.perf_counter() - start
            bondcut.tune(compressed, allow_dense=True)  # exact; makes balanced layouts evaluable quickly
            row = {**ppl(compressed), "compress_s": seconds,
                   "kept": report.target_params_after / report.target_params_before,
                   "model_kept": report.model_params_after / report.model_params_before}  # fmt: skip
            row["ppl"] = row["perplexity"]
            if report.plan:
                from bondcut.allocate import Plan

                plan = Plan.from_dict(report.plan)
                row["plan"] = {**plan.summary(), "search": plan.search}
            results["runs"].setdefault(str(removed), {})[name] = row
            print(removed, name, {k: v for k, v in row.items() if k != "plan"}, flush=True)
            write_json(args.out, results)
    if not only:
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
