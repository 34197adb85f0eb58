"""How fast is MPOLinear against dense nn.Linear on CPU, per layer and for the whole model?

Per layer: the default model's matrix shapes (SmolLM2-135M: 576x576 q/o, 192x576 k/v, 1536x576 gate/up,
576x1536 down; real layer-0 weights), each as an MPO at <= ``--fraction`` (50 %) of its parameters in three
layouts: "auto" (balanced 2 sites here), 3 balanced sites, and "lowrank" ((m x 1)(1 x n), i.e. rank r). Input is
one batch of 1 x 512 tokens. Timed under ``torch.inference_mode()`` with ``torch.set_num_threads(2)``: warm-up,
then median/min/max of >= 20 repeats. Recorded with each: the planned FLOPs per token
(``layer.flops_per_token``) against dense 2 m n, the contraction order, and, as an extra, the time of rebuilding
W from the cores on every call and doing one dense matmul instead.

Whole model: one forward of 1 x 512 tokens for the original model, ``compress(model, CompressConfig(ratio=0.5))``
(default layout) and ``CompressConfig(ratio=0.5, sites="lowrank")``, each loaded fresh; repeats are interleaved
round-robin so that all three see the same machine load.

Profile: torch.profiler on the balanced MPO layer of ``--profile-shape`` (and the dense layer for reference):
top ops by self CPU time, with input shapes.

Run (about 18 minutes on 2 cores, 14 of them the 20 forwards of the default-layout model at ~40 s each;
timings only mean something on an otherwise idle machine: the JSON records the CPU share of other processes)::

    python bench/forward.py                             # -> bench/results/forward.json and forward.png
    python bench/forward.py --model-repeats 3           # quicker whole-model numbers (about 5 minutes)
    python bench/forward.py --skip-model --repeats 20   # layers and profile only (about 1 minute)

Expect (measured on 2 AMD EPYC cores): "lowrank" plans 0.5x the dense FLOPs and runs in 0.5-0.6x the dense
time; the balanced layouts plan 8.5-14x (2 sites) and 15-32x (3 sites) the dense FLOPs at 50 % parameters and
run 50-75x slower than dense, because the 1 x 512 x r x ... intermediates are hundreds of MB (the profile shows
a permute copy and two memory-bound bmm's); rebuilding W from the cores on each call costs only 1.3-1.6x dense.
Whole model: default layout ~40x slower than the original, "lowrank" ~0.7x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from _common import CpuContention, base_parser, environment, module_type, summarize, write_json
from torch import nn

import bondcut
from bondcut.config import CompressConfig
from bondcut.models import load_model
from bondcut.mpo import chi_for_fraction, decompose, resolve_sites
from bondcut.report import pyplot, save_figure
from bondcut.surgery import dense_weight, select_targets
from bondcut.timing import repeat_timings

LAYOUTS: dict[str, int | str] = {"auto": "auto", "3-site": 3, "lowrank": "lowrank"}


def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    with torch.inference_mode():
        return [t * 1e3 for t in repeat_timings(fn, warmup, repeats)]


def rebuild_then_matmul(layer: bondcut.MPOLinear, x: torch.Tensor) -> torch.Tensor:
    """The alternative to the planned contraction: build W (m x n) from the cores, then one dense matmul."""
    return nn.functional.linear(x, layer.to_dense())  # (..., m)


def shapes_of(model: nn.Module) -> dict[tuple[int, int], tuple[str, torch.Tensor]]:
    """Each distinct (out, in) shape of the model's target matrices -> (module types, first such weight)."""
    found: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
    for target in select_targets(model, CompressConfig(chi=1)):
        w = dense_weight(model.get_submodule(target.name)).detach().float().clone()
        key = tuple(w.shape)
        kind = module_type(target.name)
        if key not in found:
            found[key] = (kind, w)
        elif kind not in found[key][0].split("/"):
            found[key] = (f"{found[key][0]}/{kind}", found[key][1])
    return found


def bench_layers(shapes: dict, args: argparse.Namespace) -> list[dict]:
    """Dense vs MPOLinear per shape and layout, same input, same run."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for (m, n), (kinds, w) in shapes.items():
        x = torch.randn(1, args.tokens, n, generator=gen)  # (B=1, T, n)
        dense = nn.Linear(n, m, bias=False)
        with torch.no_grad():
            dense.weight.copy_(w)
        dense_ms = time_ms(partial(dense, x), args.warmup, args.repeats)
        row = {
            "shape": [m, n],
            "modules": kinds,
            "tokens": args.tokens,
            "dense_params": m * n,
            "dense_flops_per_token": 2 * m * n,
            "dense_ms": summarize(dense_ms),
            "layouts": {},
        }
        for label, sites in LAYOUTS.items():
            layout = resolve_sites(m, n, sites)
            layer = bondcut.MPOLinear.from_mpo(decompose(w, sites=layout, chi=chi_for_fraction(layout, args.fraction)))
            with torch.inference_mode():
                err = float((layer(x) - x @ layer.to_dense().T).norm() / (x @ layer.to_dense().T).norm())
            mpo_ms = time_ms(partial(layer, x), args.warmup, args.repeats)
            rebuild_ms = time_ms(partial(rebuild_then_matmul, layer, x), args.warmup, args.repeats)
            row["layouts"][label] = {
                "sites": [list(s) for s in layer.sites],
                "bond_dims": list(layer.bond_dims),
                "params": layer.num_params,
                "param_fraction": layer.num_params / (m * n),
                "flops_per_token": layer.flops_per_token,
                "flops_ratio_to_dense": layer.flops_per_token / (2 * m * n),
                "contraction_order": list(layer.plan.order),
                "mpo_ms": summarize(mpo_ms),
                "time_ratio_to_dense": statistics.median(mpo_ms) / statistics.median(dense_ms),
                "rebuild_dense_each_call_ms": summarize(rebuild_ms),
                "rebuild_ratio_to_dense": statistics.median(rebuild_ms) / statistics.median(dense_ms),
                "rel_diff_vs_dense_reconstruction": err,
            }
            r = row["layouts"][label]
            print(
                f"{m:5d}x{n:<5d} {label:8s} flops x{r['flops_ratio_to_dense']:6.2f}  time x{r['time_ratio_to_dense']:6.2f}"
                f"  (mpo {statistics.median(mpo_ms):7.2f} ms, dense {statistics.median(dense_ms):6.2f} ms,"
                f" rebuild x{r['rebuild_ratio_to_dense']:.2f}) order {r['contraction_order']}"
            )
        rows.append(row)
    return rows


def top_ops(layer: nn.Module, x: torch.Tensor, calls: int, top: int) -> dict:
    """torch.profiler over ``calls`` forwards: ops by self CPU time, grouped with their input shapes."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        layer(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                layer(x)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "calls": calls,
        "self_cpu_ms_total": total / 1e3,
        "top_ops": [
            {
                "op": e.key,
                "input_shapes": str(e.input_shapes),
                "count": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "self_share": e.self_cpu_time_total / total,
            }
            for e in ranked
        ],
    }


def profile_layer(shapes: dict, args: argparse.Namespace) -> dict:
    """Where the time of one balanced MPO layer forward goes, next to the dense layer."""
    m, n = (int(v) for v in args.profile_shape.split("x"))
    if (m, n) not in shapes:
        raise SystemExit(f"--profile-shape {args.profile_shape} is not a shape of the model; have {list(shapes)}")
    w = shapes[(m, n)][1]
    layout = resolve_sites(m, n, "auto")
    layer = bondcut.MPOLinear.from_mpo(decompose(w, sites=layout, chi=chi_for_fraction(layout, args.fraction)))
    dense = nn.Linear(n, m, bias=False)
    x = torch.randn(1, args.tokens, n, generator=torch.Generator().manual_seed(1))  # (1, T, n)
    return {"shape": [m, n], "layer": repr(layer), "mpo": top_ops(layer, x, 10, 8), "dense": top_ops(dense, x, 10, 3)}


def bench_model(args: argparse.Namespace) -> dict:
    """Whole-model forward of 1 x T tokens: original, default MPO and low rank at ratio 0.5, interleaved."""
    variants = {
        "original": None,
        "mpo_auto": CompressConfig(ratio=args.fraction, allocation="uniform"),
        "lowrank": CompressConfig(ratio=args.fraction, sites="lowrank", allocation="uniform"),
    }
    models, info = {}, {}
    for label, config in variants.items():
        model, _ = load_model(args.model)  # fresh for each variant
        entry = {"config": None if config is None else config.to_dict()}
        if config is not None:
            start = time.perf_counter()
            report = bondcut.compress(model, config)
            entry.update(
                compress_seconds=time.perf_counter() - start,
                uniform_chi=report.uniform_chi,
                target_params_before=report.target_params_before,
                target_params_after=report.target_params_after,
            )
        entry["model_params"] = sum(p.numel() for p in model.parameters())
        models[label], info[label] = model, entry
    vocab = models["original"].config.vocab_size
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))  # (1, T)
    times: dict[str, list[float]] = {label: [] for label in models}
    for label, model in models.items():
        time_ms(partial(model, input_ids=ids, use_cache=False), args.model_warmup, 0)
    for rep in range(args.model_repeats):  # round-robin: the same load for every variant
        for label, model in models.items():
            times[label] += time_ms(partial(model, input_ids=ids, use_cache=False), 0, 1)
        print(
            f"model forward repeat {rep + 1}/{args.model_repeats}: "
            + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items())
        )
    base = statistics.median(times["original"])
    for label in models:
        info[label]["forward_ms"] = summarize(times[label])
        info[label]["time_ratio_to_original"] = statistics.median(times[label]) / base
    return {"tokens": args.tokens, "variants": info}


def plot(layers: list[dict], model: dict | None, path: Path) -> None:
    """Bars: time and planned FLOPs relative to dense per shape and layout; whole-model ratios."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 3 if model else 2, figsize=(16 if model else 11, 4.5), constrained_layout=True)
    labels = [f"{r['shape'][0]}x{r['shape'][1]}\n{r['modules']}" for r in layers]
    width = 0.8 / len(LAYOUTS)
    for ax, key, title in (
        (axes[0], "time_ratio_to_dense", "measured time / dense (median)"),
        (axes[1], "flops_ratio_to_dense", "planned FLOPs / dense"),
    ):
        for j, layout in enumerate(LAYOUTS):
            xs = [i + (j - 1) * width for i in range(len(layers))]
            ax.bar(xs, [r["layouts"][layout][key] for r in layers], width, label=layout)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)), labels)
        ax.set_title(title)
        ax.legend()
    if model:
        names = list(model["variants"])
        axes[2].bar(names, [model["variants"][k]["time_ratio_to_original"] for k in names], color=["gray", "C0", "C2"])
        axes[2].axhline(1.0, color="k", linewidth=0.8)
        axes[2].set_title(f"whole model forward, 1x{model['tokens']} tokens / original")
    fig.suptitle("MPOLinear vs nn.Linear on CPU at 50 % parameters (1x512 tokens)")
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], "forward.json")
    parser.add_argument("--fraction", type=float, default=0.5, help="kept parameter fraction (default 0.5)")
    parser.add_argument("--tokens", type=int, default=512, help="sequence length of the 1 x T batch")
    parser.add_argument("--warmup", type=int, default=5, help="untimed layer calls before timing")
    parser.add_argument("--repeats", type=int, default=30, help="timed layer calls (>= 20)")
    parser.add_argument("--model-warmup", type=int, default=2, help="untimed whole-model forwards per variant")
    parser.add_argument("--model-repeats", type=int, default=20, help="timed whole-model forwards per variant")
    parser.add_argument("--profile-shape", default="1536x576", help="shape of the profiled balanced MPO layer")
    parser.add_argument("--skip-model", action="store_true", help="layers and profile only")
    args = parser.parse_args()
    if args.repeats < 20:
        parser.error(f"--repeats must be >= 20 for stable medians, got {args.repeats}")

    torch.set_num_threads(args.threads)
    env = environment(args.threads)  # load average at the start
    model, _ = load_model(args.model)
    shapes = shapes_of(model)
    del model
    with CpuContention() as busy_layers:
        layers = bench_layers(shapes, args)
    prof = profile_layer(shapes, args)
    with CpuContention() as busy_model:
        whole = None if args.skip_model else bench_model(args)
    result = {
        "benchmark": "forward",
        "model": args.model,
        "fraction": args.fraction,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "load_average_at_end": list(os.getloadavg()),
        "cpu_contention": {"layers": busy_layers.result, "model": None if whole is None else busy_model.result},
        "layers": layers,
        "profile": prof,
        "model_forward": whole,
    }
    write_json(args.out, result)
    plot(layers, whole, args.out.with_suffix(".png"))
    print("\nprofile of", prof["layer"])
    for op in prof["mpo"]["top_ops"]:
        print(f"  {op['op']:28s} {op['self_share']:6.1%}  x{op['count']:<4d} {op['input_shapes']}")
    if whole:
        print(
            "whole model / original: "
            + ", ".join(f"{k} x{v['time_ratio_to_original']:.2f}" for k, v in whole["variants"].items())
        )
    print(
        f"other processes' CPU share during the layer timings {busy_layers.result['other_share']:.2f}"
        + ("" if whole is None else f", model timings {busy_model.result['other_share']:.2f}")
        + " (0 = idle machine)"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
