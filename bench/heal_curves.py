"""Held-out perplexity during healing, several runs on one plot: LM loss vs distillation, one learning rate vs another.

Reads the ``heal.json`` each ``bondcut heal`` run writes beside its model and lines their evaluations up by tokens
trained; the reference perplexity (the original's, on the same held-out tokens) is drawn as a line and each final
figure is reported as a ratio to it. No model runs here: the numbers are the runs' own.

    python bench/heal_curves.py "LM loss:bench/results/issue6/heal_m70_lm_full_pass.json" \
        "0.5 LM + 0.5 distillation:M70_KD/heal.json" --reference 35.39 --out bench/results/issue6/heal_m70_curves.json

``--paired 1-16,33-64``: also each run's training loss minus the first run's, step by step, as mean ± standard
error over those step ranges. Runs of the same seed, batch and sequence length see the same fresh batches in the
same order, so the paired difference compares the models on far more text than the held-out set, with the
batch-to-batch noise cancelled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import write_json

from bondcut.report import pyplot, save_figure


def load_run(spec: str) -> tuple[str, dict]:
    """'LABEL:PATH' -> (label, the heal.json there)."""
    label, sep, path = spec.rpartition(":")
    if not sep or not label:
        raise SystemExit(f"expected LABEL:PATH (e.g. 'LM loss:m70_lm/heal.json'), got {spec!r}")
    if not Path(path).is_file():
        raise SystemExit(f"no heal.json at {path}: give the file a `bondcut heal` run wrote beside its model")
    return label, json.loads(Path(path).read_text())


def tokens_per_step(run: dict) -> int:
    """Tokens one optimizer step trains on (all processes together)."""
    return run["config"]["batch_size"] * run["config"]["seq_len"]


def summarize_run(label: str, run: dict, reference: float | None) -> dict:
    """The run's evaluations by tokens trained, its settings and time, and its last perplexity vs ``reference``."""
    per_step = tokens_per_step(run)
    evals = [e for e in run["evals"] if e]
    final = evals[-1]["perplexity"]
    return {
        "label": label,
        "config": run["config"],
        "steps": run["steps"],
        "tokens_trained": run["steps"] * per_step,
        "passes": run["steps"] * per_step / run["train_tokens_per_pass"],
        "seconds": run["seconds"],
        "optimizer_state_bytes": run["optimizer_state_bytes"],
        "held_out_tokens": evals[0]["tokens_scored"],
        "evals": [{"step": e["step"], "tokens": e["step"] * per_step, "perplexity": e["perplexity"]} for e in evals],
        "final_perplexity": final,
        "final_vs_reference": None if reference is None else final / reference,
    }


def paired_losses(base: dict, other: dict, ranges: list[tuple[int, int]]) -> dict[str, tuple[float, float]]:
    """Per-step training loss of ``other`` minus ``base`` over each (first, last) step range: (mean, s.e.). The
    next-token part (``lm_loss``) where a run records it, so runs with distillation terms compare with LM-only ones."""
    same = ("seed", "batch_size", "seq_len", "first_batch")  # first_batch: 0 in runs older than the setting

    def settings(run: dict) -> list:
        return [run["config"].get(k, 0 if k == "first_batch" else None) for k in same]

    if settings(base) != settings(other):
        raise SystemExit(f"paired losses need runs on the same batches: {same} must match, got "
                         f"{settings(base)} and {settings(other)}")  # fmt: skip
    losses = [{p["step"]: p.get("lm_loss", p["loss"]) for p in run["curve"]} for run in (base, other)]
    out = {}
    for first, last in ranges:
        diffs = [losses[1][s] - losses[0][s] for s in range(first, last + 1) if s in losses[0] and s in losses[1]]
        if len(diffs) < 2:
            raise SystemExit(f"steps {first}-{last}: fewer than 2 steps in both runs")
        mean = sum(diffs) / len(diffs)
        se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
        out[f"steps_{first}_{last}"] = (round(mean, 5), round(se, 5))
    return out


def plot(runs: list[dict], reference: float | None, path: Path, target: float = 1.1) -> Path:
    """The runs' held-out curves; with ``reference``, the original's line and the target ratio's."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        ax.plot([e["tokens"] for e in run["evals"]], [e["perplexity"] for e in run["evals"]], marker="o",
                label=f"{run['label']}: {run['final_perplexity']:.2f}")  # fmt: skip
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=f"original: {reference:.2f}")
        ax.axhline(target * reference, color="grey", ls=":", lw=1, label=f"{target:.2f} x original (target)")
    ax.set_yscale("log")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel(f"held-out perplexity ({runs[0]['held_out_tokens']} tokens)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL:PATH of a heal.json, one per run")
    parser.add_argument("--reference", type=float, help="the original's perplexity on the same held-out tokens")
    parser.add_argument("--target", type=float, default=1.1, help="the target ratio to the original, drawn as a line")
    parser.add_argument("--out", type=Path, required=True, help="JSON path; the PNG goes beside it")
    parser.add_argument("--paired", help="step ranges, e.g. 1-16,33-64: training loss minus the first run's")
    args = parser.parse_args()
    loaded = [load_run(spec) for spec in args.runs]
    runs = [summarize_run(label, run, args.reference) for label, run in loaded]
    if args.paired:
        ranges = [tuple(int(x) for x in part.split("-")) for part in args.paired.split(",")]
        for summary, (_, run) in zip(runs[1:], loaded[1:]):
            summary["loss_minus_first_run"] = paired_losses(loaded[0][1], run, ranges)
            print(f"{summary['label']} minus {runs[0]['label']}: {summary['loss_minus_first_run']}")
    write_json(args.out, {"reference_perplexity": args.reference, "runs": runs})
    plot(runs, args.reference, args.out.with_suffix(".png"), args.target)
    for run in runs:
        ratio = "" if run["final_vs_reference"] is None else f" ({run['final_vs_reference']:.2f}x)"
        print(f"{run['label']}: {run['final_perplexity']:.2f}{ratio} after {run['tokens_trained']:,} tokens")


if __name__ == "__main__":
    main()
