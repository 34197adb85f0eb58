"""Output error ||(W - W_hat) X||_F of activation-aware vs plain TT-SVD at equal parameters, every SA/MLP matrix.

X: ``--calib-tokens`` tokens of the Brown calibration split through the original model (inputs of each layer).
Each matrix is cut to ``--fraction`` of its parameters (the chi giving at most that many entries) in two
layouts: low rank (m x 1)(1 x n), where activation-aware is the closed-form optimum (SVD-LLM), and the balanced
2-site MPO, where the input index is split and the whitening is Kronecker-factored. The error is measured on
the same calibration statistics (the objective) and, to check it generalizes, on held-out text.

Run: ``python bench/activation_aware.py`` (~4 min on 2 cores). Writes bench/results/activation_aware.json + .png.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import base_parser, environment, module_type, summarize, write_json

import bondcut
from bondcut.calibration import input_covariances
from bondcut.corpus import split_text
from bondcut.mpo import chi_for_fraction, decompose, resolve_sites
from bondcut.mpo.whiten import decompose_whitened, output_error
from bondcut.report import pyplot, save_figure
from bondcut.surgery import dense_weight, select_targets

LAYOUTS = {"lowrank": "lowrank", "balanced2": 2}


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], "activation_aware.json")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--fraction", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = bondcut.load(args.model)
    names = [t.name for t in select_targets(model, bondcut.CompressConfig(ratio=args.fraction))]
    start = time.perf_counter()
    calib, calib_tokens = input_covariances(model, tokenizer, names, tokens=args.calib_tokens)
    heldout, heldout_tokens = input_covariances(model, tokenizer, names, tokens=args.heldout_tokens,
                                                text=split_text("heldout"))  # fmt: skip
    stats_s = time.perf_counter() - start
    rows = []
    start = time.perf_counter()
    for name in names:
        weight = dense_weight(model.get_submodule(name)).detach()
        row = {"name": name, "type": module_type(name), "shape": list(weight.shape)}
        for label, layout in LAYOUTS.items():
            sites = resolve_sites(*weight.shape, layout)
            chi = chi_for_fraction(sites, args.fraction)
            plain = decompose(weight, sites=sites, chi=chi).to_dense()
            aware = decompose_whitened(weight, calib[name], sites=sites, chi=chi).to_dense()
            for split, cov in (("calib", calib[name]), ("heldout", heldout[name])):
                row[f"{label}_{split}_ratio"] = output_error(weight, aware, cov) / output_error(weight, plain, cov)
            row[f"{label}_chi"] = chi
        rows.append(row)
    decompose_s = time.perf_counter() - start

    summary = {}
    for label in LAYOUTS:
        for split in ("calib", "heldout"):
            key = f"{label}_{split}_ratio"
            summary[key] = summarize([r[key] for r in rows])
            summary[key]["by_type"] = {
                t: statistics.median(r[key] for r in rows if r["type"] == t)
                for t in dict.fromkeys(r["type"] for r in rows)
            }
    results = {
        "benchmark": "activation_aware",
        "model": args.model,
        "fraction": args.fraction,
        "calibration_tokens": calib_tokens,
        "heldout_tokens": heldout_tokens,
        "statistics_seconds": stats_s,
        "decompose_seconds": decompose_s,
        "summary": summary,
        "layers": rows,
        "environment": environment(args.threads),
    }
    write_json(args.out, results)
    plot(rows, args.out.with_suffix(".png"))
    for key, value in summary.items():
        print(f"{key}: median {value['median']:.3f} (min {value['min']:.3f}, max {value['max']:.3f}) by type "
              + ", ".join(f"{t} {v:.3f}" for t, v in value["by_type"].items()))  # fmt: skip


def plot(rows: list[dict], path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label in LAYOUTS:
        ax.plot([r[f"{label}_heldout_ratio"] for r in rows], ".", label=f"{label} (held-out X)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.7, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("matrix (block-major: q k v o gate up down)")
    ax.set_ylabel("output error: aware / plain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
