"""Markdown report with PNG plots from ``bondcut bench`` and ``bondcut eval`` JSON, models side by side."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .cache import atomic_write_text

MB = 2**20


def _spread(stats: dict | None, fmt: str = "{:.1f}") -> str:
    """'median (min–max)' of a summarize() dict, or '–'."""
    if not stats or not stats.get("n"):
        return "–"
    return f"{fmt.format(stats['median'])} ({fmt.format(stats['min'])}–{fmt.format(stats['max'])})"


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_markdown(report: dict) -> str:
    """Absolute figures (median, min–max) per model, then every figure as a ratio to the baseline."""
    settings = report["settings"]
    env = report["environment"]
    batches = settings["decode_batches"]
    header = ["model", "params", "param MB", "disk MB", f"prefill 1x{settings['prefill_tokens']} tok/s"]
    header += [f"decode b{b} tok/s" for b in batches]
    header += [f"train step {settings['train_batch']}x{settings['train_seq']} s", "peak RSS infer MB", "peak RSS train MB",
               "CPU taken by others"]  # fmt: skip
    rows = []
    for name, res in report["models"].items():
        inf, train = res.get("inference", {}), res.get("training", {})
        facts = inf or train
        others = max((r.get("cpu_contention", {}).get("other_share", 0.0) for r in (inf, train) if r), default=0.0)
        row = [name, f"{facts.get('params', 0) / 1e6:.1f} M", f"{facts.get('param_bytes', 0) / MB:.0f}",
               f"{facts.get('disk_bytes', 0) / MB:.0f}", _spread(inf.get("prefill_tokens_per_s"))]  # fmt: skip
        row += [_spread(inf.get(f"decode_b{b}_tokens_per_s")) for b in batches]
        row += [_spread(train.get("step_s"), "{:.2f}"), _mb(inf.get("peak_rss_mb")), _mb(train.get("peak_rss_mb")),
                f"{others:.0%}"]  # fmt: skip
        rows.append(row)
    parts = [
        "## Speed and memory",
        (
            f"torch {env['torch']}, {env['torch_threads']} threads on {env['cpu_count']} CPUs, {env['date']}. "
            f"Median of {settings['repeats']} repeats after {settings['warmup']} warm-up (min–max in brackets); "
            f"decode: greedy, KV cache, {settings['decode_new_tokens']} new tokens after a "
            f"{settings['decode_prompt_tokens']}-token prompt; training: forward + backward + AdamW, "
            f"{settings['train_params']} parameters trainable. 'CPU taken by others' above ~10 % means noisy timings."
        ),
        "",
        _table(header, rows),
    ]
    if report.get("ratios"):
        names = list(report["ratios"])
        figures = sorted({f for r in report["ratios"].values() for f in r})
        parts += ["", f"### Ratios to {report['baseline']} (same run; speedup > 1 is faster, size < 1 is smaller)", ""]
        parts.append(_table(["figure", *names], [[f, *(f"{report['ratios'][n].get(f, float('nan')):.3f}" for n in names)]
                                                  for f in figures]))  # fmt: skip
    tuned = {n: r["inference"]["tune"] for n, r in report["models"].items() if "tune" in r.get("inference", {})}
    for name, tune in tuned.items():
        chosen = Counter("+".join(str(g) for g in layer["chosen"]) for layer in tune["layers"])
        title = (f"### Per-layer inference choice for {name} (measured, {tune['seconds']:.0f} s; "
                 f"dense allowed: {tune['allow_dense']}; extra memory {tune['extra_bytes'] / MB:.1f} MB)")  # fmt: skip
        parts += ["", title, ""]
        parts.append("Chosen merges (group sizes of cores; all 1s = plain cores, one group = dense): "
                     + ", ".join(f"{label}: {count} layers" for label, count in chosen.most_common()))  # fmt: skip
        rows = []
        seen = set()
        for layer in tune["layers"]:
            key = tuple(sorted(layer["candidates"]))
            signature = (key, tuple(layer["params"].values()))
            if signature in seen:
                continue
            seen.add(signature)
            for label, times in layer["candidates"].items():
                mark = " (chosen)" if label == "+".join(str(g) for g in layer["chosen"]) else ""
                rows.append([layer["name"], label + mark, f"{layer['params'][label]:,}",
                             f"{layer['flops_per_token'][label]:,}", *(f"{ms:.3f}" for ms in times.values())])  # fmt: skip
        tokens = next(iter(tune["layers"][0]["candidates"].values())).keys() if tune["layers"] else []
        parts += ["", _table(["first layer of its layout", "merge", "entries", "FLOPs/token",
                              *(f"ms at {t} tokens" for t in tokens)], rows)]  # fmt: skip
    return "\n".join(parts) + "\n"


def eval_markdown(evals: Sequence[dict]) -> str:
    """Perplexity (with context, stride, tokens), zero-shot accuracy ± stderr, and greedy generations."""
    tasks = sorted({t for e in evals for t in e.get("zero_shot", {})})
    header = ["model", "perplexity", *(f"{t} acc" for t in tasks)]
    rows = []
    for e in evals:
        ppl = e["perplexity"]
        row = [e.get("model", "?"), f"{ppl['perplexity']:.2f}"]
        for t in tasks:
            r = e.get("zero_shot", {}).get(t)
            row.append(f"{r['acc']:.3f} ± {r['acc_stderr']:.3f} (n={r.get('n', '?')})" if r else "–")
        rows.append(row)
    first = evals[0]["perplexity"]
    setup = (f"Perplexity on {evals[0].get('corpus', 'held-out text')}: context {first['context']}, stride "
             f"{first['stride']}, {first['tokens_scored']:,} tokens scored. Accuracy ± standard error as "
             f"lm-evaluation-harness reports them.")  # fmt: skip
    parts = ["## Quality", setup, "", _table(header, rows), "", "### Greedy generations", ""]
    for e in evals:
        for prompt, text in e.get("generations", {}).items():
            one_line = text.replace("\n", " ⏎ ")
            parts.append(f"- **{e.get('model', '?')}** — *{prompt}*{one_line}")
    return "\n".join(parts) + "\n"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed; imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG via a hidden temp file and a rename (never half a file), then close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def plot_bench(report: dict, out_dir: Path) -> list[Path]:
    """Bar charts of speedups and size fractions relative to the baseline (one PNG each)."""
    plt = pyplot()

    paths = []
    if not report.get("ratios"):
        return paths
    names = list(report["ratios"])
    groups = {
        "speedup": [f for f in next(iter(report["ratios"].values())) if f.endswith("speedup")],
        "size": [f for f in next(iter(report["ratios"].values())) if not f.endswith("speedup")],
    }
    for kind, figures in groups.items():
        if not figures:
            continue
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(figures) * max(len(names), 1) ** 0.5, 3.6))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [report["ratios"][name].get(f, float("nan")) for f in figures]
            ax.bar([j + i * width for j in range(len(figures))], values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(figures))])
        ax.set_xticklabels([f.replace("_speedup", "").replace("_", " ") for f in figures], rotation=20, ha="right")
        ax.set_ylabel("speedup vs baseline" if kind == "speedup" else "fraction of baseline")
        ax.set_title(f"{kind} relative to {report['baseline']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"bench_{kind}.png"
        paths.append(save_figure(fig, path))
    return paths


def plot_quality(evals: Sequence[dict], out_dir: Path) -> Path:
    """Perplexity (log scale) and zero-shot accuracy with ±1 stderr error bars, one bar per model."""
    plt = pyplot()

    names = [e.get("model", "?") for e in evals]
    tasks = sorted({t for e in evals for t in e.get("zero_shot", {})})
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(3.2 * (1 + len(tasks)), 3.4), squeeze=False)
    axes = axes[0]
    axes[0].bar(range(len(evals)), [e["perplexity"]["perplexity"] for e in evals])
    axes[0].set_yscale("log")
    axes[0].set_title("held-out perplexity")
    for ax, task in zip(axes[1:], tasks):
        rows = [e.get("zero_shot", {}).get(task) or {"acc": float("nan"), "acc_stderr": 0.0} for e in evals]
        ax.bar(range(len(evals)), [r["acc"] for r in rows], yerr=[r["acc_stderr"] for r in rows], capsize=3)
        ax.set_title(f"{task} accuracy")
    for ax in axes:
        ax.set_xticks(range(len(evals)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=7)
    fig.tight_layout()
    path = out_dir / "quality.png"
    return save_figure(fig, path)


def write_report(out_dir: str | os.PathLike, bench: dict | None = None, evals: Sequence[dict] = ()) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; returns the Markdown path."""
    if bench is None and not evals:
        raise ValueError("nothing to report: give a bench JSON and/or eval JSONs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# bondcut report", ""]
    if evals:
        parts.append(eval_markdown(evals))
        parts.append(f"![quality]({plot_quality(evals, out_dir).name})\n")
    if bench is not None:
        parts.append(bench_markdown(bench))
        parts += [f"![{p.stem}]({p.name})\n" for p in plot_bench(bench, out_dir)]
    return atomic_write_text(out_dir / "report.md", "\n".join(parts))


def plot_profile(profile: dict, path: str | os.PathLike) -> Path:
    """Heatmaps of the KL to the original (or, for old profiles, the loss increase; log scale), block depth x
    module type, one panel per kept fraction."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    layers = profile["layers"]
    key = "kl" if all("kl" in entry for entry in layers.values()) else "delta_loss"
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in layers))
    blocks = sorted({int(part) for name in layers for part in name.split(".") if part.isdigit()})
    fractions = profile["fractions"]
    fig, axes = plt.subplots(
        1, len(fractions), figsize=(2.6 * len(fractions) + 1, 0.18 * len(blocks) + 2), squeeze=False
    )
    values = [max(d, 1e-4) for entry in layers.values() for d in entry[key]]
    norm = LogNorm(vmin=min(values), vmax=max(values))
    for f_index, (ax, fraction) in enumerate(zip(axes[0], fractions)):
        grid = [[float("nan")] * len(kinds) for _ in blocks]
        for name, entry in layers.items():
            block = next(int(p) for p in name.split(".") if p.isdigit())
            grid[blocks.index(block)][kinds.index(name.rsplit(".", 1)[-1])] = max(entry[key][f_index], 1e-4)
        image = ax.imshow(grid, aspect="auto", cmap="magma", norm=norm)
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([k.replace("_proj", "") for k in kinds], rotation=45, fontsize=7)
        ax.set_yticks(range(0, len(blocks), 5))
        ax.set_yticklabels(blocks[::5])
        ax.set_title(f"keep {fraction:.0%}", fontsize=9)
    axes[0][0].set_ylabel("block")
    label = "KL to the original (nats/token)" if key == "kl" else "loss increase (nats/token)"
    fig.colorbar(image, ax=axes[0].tolist(), label=label)
    return save_figure(fig, path, dpi=110)


def plot_heal(result: dict, path: str | os.PathLike) -> Path:
    """Healing curve: training loss per step and held-out perplexity at each evaluation."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [p["step"] for p in result["curve"]]
    left.plot(steps, [p["loss"] for p in result["curve"]], lw=1)
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss (nats/token)")
    evals = [e for e in result["evals"] if e]
    right.plot([e["step"] for e in evals], [e["perplexity"] for e in evals], marker="o")
    right.set_yscale("log")
    right.set_xlabel("optimizer step")
    tokens = evals[0]["tokens_scored"] if evals else 0
    right.set_ylabel(f"held-out perplexity ({tokens} tokens)")
    fig.suptitle(f"healing: {result['steps']} steps x {result['config']['batch_size']} x {result['config']['seq_len']} "
                 f"tokens, {result['processes']} process(es)")  # fmt: skip
    fig.tight_layout()
    return save_figure(fig, path)
