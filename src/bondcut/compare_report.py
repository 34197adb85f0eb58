"""The table and bar charts of ``bondcut compare``: every figure beside the original's, as the paper lays them out."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .report import _table, pyplot, save_figure

LABELS = {
    "original": "original",
    "original_tuned": "original, fine-tuned (same budget)",
    "int8": "int8 (weight-only)",
    "int4": "int4 (weight-only)",
    "int4_gptq": "int4 GPTQ (weight-only)",
    "svd": "truncated SVD",
    "svd_llm": "aware low rank (SVD-LLM)",
    "layerchop": "LayerChop",
    "bondcut": "bondcut MPO",
    "bondcut_int4": "bondcut MPO + int4",
    "joint": "bondcut joint search",
}
JOINT_HEALING_NOTES = {  # CompareConfig.joint_healing -> what the healing line says
    "float": "the joint model heals its float MPO cores, then packs",
    "packed": "the joint model packs, then heals its scales and offsets",
    "aware": "the joint model packs its dense part, then heals its cores through their rounding beside its scales",
}


def mean_accuracy(zero_shot: dict) -> tuple[float, float] | None:
    """Mean accuracy over tasks and its standard error (tasks independent), or None when no task ran."""
    if not zero_shot:
        return None
    accs = [t["acc"] for t in zero_shot.values()]
    errors = [t.get("acc_stderr") or 0.0 for t in zero_shot.values()]
    return sum(accs) / len(accs), math.sqrt(sum(e * e for e in errors)) / len(errors)


def rows(report: dict) -> list[dict]:
    """One dict of comparable figures per method (fractions of the original; None where not measured)."""
    methods = {m["method"]: m for m in report["methods"]}
    base = methods["original"]
    tuned = methods.get("original_tuned")
    speed = report["speed"]["per_method"]
    out = []
    for name, m in methods.items():
        before = m.get("perplexity_before_heal")
        acc = mean_accuracy(m.get("zero_shot") or {})
        out.append({
            "method": name,
            "weights": m["weights"] / base["weights"],
            "target_weights": m["target_weights"] / base["target_weights"],
            "disk_vs_fp32": m["disk_bytes"] / base["disk_bytes"],
            "ppl_before": before["perplexity"] if before else None,
            "ppl": m["perplexity"]["perplexity"],
            "ppl_ratio": m["perplexity"]["perplexity"] / base["perplexity"]["perplexity"],
            "ppl_vs_tuned": m["perplexity"]["perplexity"] / tuned["perplexity"]["perplexity"] if tuned else None,
            "accuracy": acc,
            "decode_speedup": speed[name]["decode_speedup"],
            "train_speedup": speed[name]["train_step_speedup"],
            "generation": m.get("generation", ""),
            "notes": m.get("notes", ""),
        })  # fmt: skip
    return out


def _fmt(value, pattern: str = "{:.2f}") -> str:
    return "—" if value is None else pattern.format(value)


def compare_markdown(report: dict) -> str:
    """The comparison table (Markdown), with the settings that make its figures comparable."""
    config = report["config"]
    base = next(m for m in report["methods"] if m["method"] == "original")
    ppl = base["perplexity"]
    data = rows(report)
    tuned = any(r["ppl_vs_tuned"] is not None for r in data)
    table = _table(
        ["method", "SA+MLP kept", "weights kept", "disk vs fp32", "disk vs fp16", "ppl before heal", "ppl",
         "ppl / original", *(["ppl / fine-tuned original"] if tuned else []), "zero-shot acc ± se", "decode speed",
         "train step speed", "notes"],
        [
            [LABELS.get(r["method"], r["method"]), _fmt(r["target_weights"], "{:.1%}"), _fmt(r["weights"], "{:.1%}"),
             _fmt(r["disk_vs_fp32"], "{:.1%}"), _fmt(2 * r["disk_vs_fp32"], "{:.1%}"), _fmt(r["ppl_before"], "{:,.1f}"),
             _fmt(r["ppl"], "{:,.2f}"), _fmt(r["ppl_ratio"], "{:.2f}x"),
             *([_fmt(r["ppl_vs_tuned"], "{:.2f}x")] if tuned else []),
             "—" if r["accuracy"] is None else f"{r['accuracy'][0]:.3f} ± {r['accuracy'][1]:.3f}",
             _fmt(r["decode_speedup"], "{:.2f}x"), _fmt(r["train_speedup"], "{:.2f}x"), r["notes"]]
            for r in data
        ],
    )  # fmt: skip
    samples = "\n".join(f"- **{LABELS.get(r['method'], r['method'])}**: …{r['generation']!r}" for r in data)
    scales = (f"int8/int4 train their group scales and offsets (codes fixed, lr {config['scale_lr']:g})"
              if "scale_lr" in config else "int8/int4 are not retrained")  # fmt: skip  # reports before scale healing
    joint = JOINT_HEALING_NOTES[config.get("joint_healing", "float")]  # reports from before the option: "float"
    heal = (f"{config['heal_tokens']:,} tokens of the train split (lr {config['heal_lr']:g}, distillation weight "
            f"{config['distill']:g}); {scales}; {joint}") if config["heal_tokens"] else "none"  # fmt: skip
    env = report["speed"]["environment"]
    return "\n".join([
        f"# bondcut compare: {report['original']} at {config['ratio']:.0%} of the SA+MLP parameters kept",
        "",
        table,
        "",
        f"- Perplexity: Brown held-out press text, context {ppl['context']}, stride {ppl['stride']}, "
        f"{ppl['tokens_scored']:,} tokens scored; original {ppl['perplexity']:.2f}.",
        f"- Healing budget, the same for every method that trains: {heal}.",
        *(["- The fine-tuned original trained on that budget too: healing also adapts a model to the corpus the "
           "held-out text comes from, so healed rows compare fairly to it, not to the untuned original. Its speed "
           "is the original's (same architecture), not timed again."] if tuned else []),
        "- Disk: weight files; fp16 column = bytes / (original fp32 bytes / 2).",
        f"- Speed: ratios to the original in the same run (decode batch 1, KV cache; one training step "
        f"{report['speed']['settings']['train_batch']}x256 tokens), {env['torch_threads']} threads; "
        "int4 layers multiply through PyTorch's CPU int4 kernel, int8 layers and "
        "packed cores dequantize per call; quality is scored on the exact (dequantizing) path.",
        "- Zero-shot: " + (", ".join(config["tasks"]) + (f" (first {config['task_limit']} items)" if config["task_limit"]
                                                          else "") if config["tasks"] else "not run (--tasks)"),
        "",
        "Greedy continuations of \"The capital of France is\":",
        "",
        samples,
        "",
    ])  # fmt: skip


def plot_compare(report: dict, path: str | os.PathLike) -> Path:
    """Bar charts, one per figure, methods side by side: sizes, perplexity ratio, speedups."""
    plt = pyplot()
    data = rows(report)
    names = [LABELS.get(r["method"], r["method"]) for r in data]
    panels = [
        ("weights kept (fraction)", [r["weights"] for r in data]),
        ("disk vs fp32 (fraction)", [r["disk_vs_fp32"] for r in data]),
        ("perplexity / original (log)", [r["ppl_ratio"] for r in data]),
        ("decode speed vs original", [r["decode_speedup"] or 0 for r in data]),
        ("train step speed vs original", [r["train_speedup"] or 0 for r in data]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.5), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        ax.barh(names, values, color=["#888" if n == "original" else "#3a7" for n in names])
        ax.set_title(title, fontsize=10)
        ax.axvline(1.0, color="k", lw=0.6)
        if "log" in title:
            ax.set_xscale("log")
    axes[0].invert_yaxis()
    fig.suptitle(f"{report['original']}: {report['config']['ratio']:.0%} of SA+MLP kept, "
                 f"healing {report['config']['heal_tokens']:,} tokens")  # fmt: skip
    fig.tight_layout()
    return save_figure(fig, path)
