"""The ``bondcut`` command line: each command parses, calls the library, prints."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .progress import LoggedProgress

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make causal LMs small with MPOs, and prove it.")
# wide enough for module names when output is piped (rich defaults to 80 columns off a terminal)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _parse_int_list(text: str, option: str, example: str) -> tuple[int, ...]:
    """'32,64,128' -> (32, 64, 128); anything else is a clear error naming ``option``."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        _fail(f"{option} takes whole numbers separated by commas, e.g. {example}; got {text!r}")
    return values


def _parse_tiers(options: list[str] | None) -> tuple[str, ...] | None:
    """--embedding-tiers as given: None (not given: the default tiers), 'none' (no tiers), or the tiers listed."""
    if options is None:
        return None
    return () if [o.lower() for o in options] == ["none"] else tuple(options)


def _parse_group_sizes(text: str) -> tuple[int, ...]:
    return _parse_int_list(text, "--group-sizes", "32,64,128")


def _parse_sites(sites: str) -> int | str:
    if sites in ("auto", "lowrank"):
        return sites
    try:
        return int(sites)
    except ValueError:
        _fail(f"--sites must be 'auto', 'lowrank' or a number of sites such as 3, got {sites!r}")


def _resolve(model: str) -> Path:
    """The HF directory for a model name, or a clear CLI error."""
    from .models import ModelNotFoundError, resolve_model

    try:
        return resolve_model(model)
    except ModelNotFoundError as err:
        _fail(str(err))


def _load(model: str, source: Path):
    """(model, tokenizer) from a resolved directory, quietly (no transformers progress bars)."""
    import transformers

    import bondcut

    transformers.utils.logging.disable_progress_bar()
    with console.status(f"loading {model}"):
        return bondcut.load(source)


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="HF directory, .gguf file, or alias (smollm2-135m, gemma3-270m)")],
    out: Annotated[Path, typer.Option("--out", help="directory to write the compressed model to")],
    chi: Annotated[int | None, typer.Option(help="max bond dimension for every layer")] = None,
    ratio: Annotated[float | None, typer.Option(help="fraction of SA+MLP parameters to keep, e.g. 0.5")] = None,
    tol: Annotated[float | None, typer.Option(help="relative Frobenius error per matrix")] = None,
    sites: Annotated[str, typer.Option(help="'auto', 'lowrank' or a number of sites")] = "auto",
    include: Annotated[list[str] | None, typer.Option(help="only these modules (name, glob or re:regex)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="skip these modules (name, glob or re:regex)")] = None,
    modules: Annotated[list[str] | None, typer.Option(help="explicit modules, for unsupported architectures")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    calib_tokens: Annotated[
        int | None,
        typer.Option(
            help="activation-aware: minimize output error on N calibration tokens (0 = plain TT-SVD; "
            "default 16384 with --allocation profile, else 0)"
        ),
    ] = None,  # fmt: skip
    allocation: Annotated[
        str,
        typer.Option(help="with --ratio: 'profile' (per-layer layout and chi from a sensitivity profile) or 'uniform'"),
    ] = "profile",  # fmt: skip
    ratio_of: Annotated[
        str, typer.Option(help="--ratio of the 'targets' (SA+MLP) or of the whole 'model'")
    ] = "targets",
    profile: Annotated[
        Path | None, typer.Option(help="sensitivity profile JSON to reuse or write (default: cached per model)")
    ] = None,  # fmt: skip
    profile_tokens: Annotated[int, typer.Option(help="calibration tokens per profile evaluation")] = 512,
    search: Annotated[int, typer.Option(help="refine the plan with N real evaluations (EvoPress-style; 0 = off)")] = 0,
    search_tokens: Annotated[
        int, typer.Option(help="unseen calibration tokens each search evaluation measures KL on (more: less noise)")
    ] = 1024,
    search_objective: Annotated[
        str,
        typer.Option(help="what the search minimizes: 'kl' (to the original) or 'nll' (of the text: log perplexity)"),
    ] = "kl",
    target_bytes: Annotated[
        str | None,
        typer.Option(
            help="instead of --ratio: weight bytes on disk, e.g. 60MB, or a share of the fp32 weights, e.g. 10% "
            "(90 % smaller); MPO, int8/int4/int3 and block deletion are chosen jointly"
        ),
    ] = None,  # fmt: skip
    max_deleted_blocks: Annotated[int, typer.Option(help="with --target-bytes: blocks it may delete")] = 4,
    group_sizes: Annotated[
        str,
        typer.Option(
            help="with --target-bytes: packing group sizes to try, comma-separated (one per plan, the least "
            "predicted KL wins), e.g. 32,64,128"
        ),
    ] = "64",  # fmt: skip
    bits: Annotated[
        str,
        typer.Option(
            help="with --target-bytes: packed widths the search may give a matrix, comma-separated, from 8,4,3,2 "
            "(3 and 2 bits have no fast CPU kernel: they dequantize in the forward)"
        ),
    ] = "8,4",  # fmt: skip
    embedding_tiers: Annotated[
        list[str] | None,
        typer.Option(
            help="with --target-bytes: row tiers the search may also give a tied embedding (bits:share, the rows "
            "used most first), repeatable, e.g. --embedding-tiers 8:0.1,4:0.4,3:0.5; 'none': no tiers "
            "(default: 8:0.1,4:0.4,3:0.5, 8:0.05,4:0.45,3:0.5 and 8:0.1,4:0.9)"
        ),
    ] = None,  # fmt: skip
    rounding: Annotated[
        str, typer.Option(help="with --target-bytes: round packed dense matrices 'gptq' (activation-aware) or 'rtn'")
    ] = "gptq",
    rotate: Annotated[
        bool,
        typer.Option(
            help="with --target-bytes: packed dense matrices rotate their inputs by a random block Hadamard first "
            "(less rounding error; small run-time cost)"
        ),
    ] = False,  # fmt: skip
    rounding_weight: Annotated[
        float,
        typer.Option(
            help="with --target-bytes: weight of rounding damage against truncation's in the plan (1 = the model "
            "as packed; 0.3 = planned for healing, which takes back more of rounding's damage)"
        ),
    ] = 1.0,  # fmt: skip
    defer_packing: Annotated[
        bool,
        typer.Option(
            help="with --target-bytes: leave the packing pending, to heal the float model first "
            "(then: bondcut quantize DIR --pending)"
        ),
    ] = False,  # fmt: skip
    refit_tokens: Annotated[
        int,
        typer.Option(
            help="after the surgery, refit the MPO layers block by block to the original's outputs on the inputs "
            "the compressed model gives them, on N calibration tokens (0 = off; e.g. 32768)"
        ),
    ] = 0,  # fmt: skip
    mlp_neurons: Annotated[
        bool,
        typer.Option(
            help="build each compressed gated MLP from its most used hidden neurons (down projection refit by "
            "least squares) instead of low-rank factors; with --ratio the plan sizes every MLP in neurons"
        ),
    ] = False,  # fmt: skip
) -> None:
    """Replace the self-attention and MLP matrices by MPOs (and, with --target-bytes, pack/delete jointly); save."""
    import bondcut

    from .config import CompressConfig
    from .joint import precision_text
    from .sizes import directory_weight_bytes

    if out.exists() and not overwrite:
        _fail(f"{out} already exists; pass --overwrite or choose another --out")
    try:
        config = CompressConfig(
            target_bytes=target_bytes,
            max_deleted_blocks=max_deleted_blocks,
            group_sizes=_parse_group_sizes(group_sizes) if target_bytes is not None else (),
            joint_bits=_parse_int_list(bits, "--bits", "8,4,3"),
            embedding_tiers=_parse_tiers(embedding_tiers),
            joint_rounding=rounding,
            joint_rotate=rotate,
            rounding_weight=rounding_weight,
            defer_packing=defer_packing,
            chi=chi, ratio=ratio, tol=tol, sites=_parse_sites(sites), include=include,
            exclude=exclude or [], modules=modules, calibration_tokens=calib_tokens, allocation=allocation,
            ratio_of=ratio_of, profile=None if profile is None else str(profile), profile_tokens=profile_tokens,
            search_evaluations=search, search_tokens=search_tokens, search_objective=search_objective,
            refit_tokens=refit_tokens, mlp_neurons=mlp_neurons,
        )  # fmt: skip
    except ValueError as err:
        _fail(str(err))
    source = _resolve(model)
    net, tokenizer = _load(model, source)
    with LoggedProgress(
        TextColumn("[bold]compressing"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("", total=None)

        def on_layer(layer, index: int, total: int) -> None:
            progress.update(task, total=total, completed=index + 1, description=f"{layer.name} chi={layer.bond_dims}")

        def on_stage(stage: str, done: int, total: int) -> None:
            progress.update(task, total=total, completed=done, description=STAGES.get(stage, stage))

        try:
            report = bondcut.compress(net, config, on_layer=on_layer, tokenizer=tokenizer, on_stage=on_stage)
        except ValueError as err:
            _fail(str(err))
    with console.status(f"saving to {out}"):
        bondcut.save(net, out, tokenizer=tokenizer, overwrite=overwrite,
                     extra_files={"bondcut_report.json": json.dumps(report.to_dict(), indent=1)})  # fmt: skip
    console.print(summary_table(report, directory_weight_bytes(source), directory_weight_bytes(out)))
    if report.joint:
        joint = report.joint
        console.print(f"joint plan: {len(joint['removed_blocks'])} blocks deleted {joint['removed_blocks']}, embedding "
                      f"{precision_text(joint['embedding_bits'])}, packed in "
                      f"groups of {joint['group_size']}, predicted "
                      f"{joint['predicted_bytes'] / 1e6:.1f} MB of {joint['budget_bytes'] / 1e6:.1f} MB, "
                      f"predicted KL {joint['predicted_kl']:.3f} nats/token")  # fmt: skip
    if report.plan:
        console.print(plan_summary(report.plan))
        console.print(plan_table(report.plan))
    narrowed_line = neuron_line(report.layers)
    if narrowed_line:
        console.print(narrowed_line)
    dense_line = kept_dense_line(report.layers)
    if dense_line:
        console.print(dense_line)
    console.print(f"saved to {out}")


STAGES = {
    "statistics": "input statistics (calibration windows)",
    "candidates": "pricing layouts and chi (SVDs)",
    "profile": "profile: loss per matrix and size",
    "search": "search: evaluations",
    "refit": "refit: blocks, in order",
}


def plan_summary(plan: dict) -> str:
    """One line: how the plan was found, what it keeps, and what the search changed."""
    from .allocate import Plan

    parsed = Plan.from_dict(plan)
    line = f"allocation ({parsed.method}): {parsed.params:,} of {parsed.dense_params:,} SA+MLP weights kept"
    search = parsed.search
    if "loss_after" in search:
        line += (f"; search ({search.get('objective', 'kl')}): {search['evaluations']} evaluations, KL to the original "
                 f"{search['kl_before']:.4f} -> {search['kl_after']:.4f}, calibration loss {search['loss_before']:.4f} -> "
                 f"{search['loss_after']:.4f}")  # fmt: skip
    return line


def neuron_line(layers) -> str | None:
    """One line on the MLPs rebuilt as neuron selections (--mlp-neurons): how many, and the hidden neurons each kept;
    None when there are none. Their down projections are the narrowed layers that keep their output width."""
    downs = [(layer.sites[0][1], layer.shape[1]) for layer in layers
             if len(layer.sites) == 1 and layer.sites[0][0] == layer.shape[0] and layer.sites[0][1] < layer.shape[1]]  # fmt: skip
    if not downs:
        return None
    kept = sorted(k for k, _ in downs)
    return (f"{len(downs)} MLPs rebuilt as neuron selections: {kept[0]:,}-{kept[-1]:,} of {downs[0][1]:,} hidden "
            f"neurons kept")  # fmt: skip


def kept_dense_line(layers) -> str | None:
    """One line on the matrices left dense: how many for each reason (a joint plan packs them at several widths),
    and the first few names; None when every matrix was compressed."""
    dense = [layer for layer in layers if layer.kept_dense]
    if not dense:
        return None
    names = ", ".join(d.name for d in dense[:4]) + (", ..." if len(dense) > 4 else "")
    reasons = "; ".join(f"{n} {why}" for why, n in Counter(d.kept_dense for d in dense).most_common())
    return f"{len(dense)} matrices kept dense ({reasons}): {names} (all in bondcut_report.json)"


def plan_table(plan: dict) -> Table:
    """The allocation plan by module type: kept fraction and how many matrices took each layout."""
    from .allocate import Plan

    parsed = Plan.from_dict(plan)
    summary = parsed.summary()
    table = Table(title="allocation by module type")
    for column in ("module", "kept", "dense", *[k for k in summary["layouts"] if k != "dense"]):
        table.add_column(column, justify="left" if column == "module" else "right")
    layouts = [k for k in summary["layouts"] if k != "dense"]
    for kind, kept in summary["kept_by_type"].items():
        choices = [c for name, c in parsed.layers.items() if name.rsplit(".", 1)[-1] == kind]
        counts = [sum(c.layout == layout for c in choices) for layout in ("dense", *layouts)]
        table.add_row(kind, f"{kept:.3f}", *map(str, counts))
    return table


def summary_table(report, bytes_before: int, bytes_after: int) -> Table:
    """Before/after table: compressed layers, whole model, file size."""
    from .sizes import percent_removed

    how = "allocated per matrix" if report.plan else f"uniform chi={report.uniform_chi}"
    table = Table(title=f"bondcut compress ({len(report.layers)} matrices, {how})")
    for column in ("", "before", "after", "kept", "removed"):
        table.add_column(column, justify="right" if column else "left")
    rows = [
        ("SA+MLP params", report.target_params_before, report.target_params_after, "{:,}"),
        ("model params", report.model_params_before, report.model_params_after, "{:,}"),
        ("weights on disk (MB)", bytes_before / 1e6, bytes_after / 1e6, "{:,.1f}"),
    ]
    for label, before, after, fmt in rows:
        table.add_row(label, fmt.format(before), fmt.format(after), f"{after / before:.3f}",
                      f"{percent_removed(before, after):.1f} %")  # fmt: skip
    return table


@app.command()
def info(directory: Annotated[Path, typer.Argument(help="a directory written by bondcut compress")]) -> None:
    """Print the per-layer MPO layout of a saved model (reads config.json only)."""
    config_file = directory / "config.json"
    if not config_file.exists():
        _fail(f"{directory} has no config.json; expected a directory written by `bondcut compress`")
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "bondcut_mpo":
        _fail(f"{directory} is not a bondcut MPO model (config.json has no bondcut_mpo quantization_config)")
    table = Table(title=f"{directory}: {len(quant['layers'])} MPO layers (format {quant['format_version']})")
    for column in ("module", "shape", "sites", "bond dims", "params", "kept"):
        table.add_column(column, justify="left" if column == "module" else "right")
    total_dense = total_mpo = 0
    for name, layout in quant["layers"].items():
        m, n = layout.get("replaced_shape", layout["shape"])  # a neuron-selected MLP matrix: what it replaced
        ranks = [1, *layout["bond_dims"], 1]
        params = sum(ranks[i] * a * b * ranks[i + 1] for i, (a, b) in enumerate(layout["sites"]))
        total_dense, total_mpo = total_dense + m * n, total_mpo + params
        sites = "".join(f"({a}x{b})" for a, b in layout["sites"])
        table.add_row(name, f"{m}x{n}", sites, str(layout["bond_dims"]), f"{params:,}", f"{params / (m * n):.3f}")
    table.add_row("total", "", "", "", f"{total_mpo:,}", f"{total_mpo / total_dense:.3f}")
    console.print(table)


_TASKS_HELP = "zero-shot tasks (lm-eval), comma separated or repeated: brown_cloze, brown_lastword, or all"


def _parse_tasks(values: list[str] | None) -> tuple[str, ...]:
    """``--tasks`` values (repeated and/or comma separated; ``all`` for every task) as checked task names."""
    from .zeroshot import TASKS, check_tasks

    names = [name.strip() for value in values or () for name in value.split(",") if name.strip()]
    others = [name for name in dict.fromkeys(names) if name != "all"]
    try:
        checked = check_tasks(others) if others else ()
    except ValueError as err:
        _fail(str(err))
    return TASKS if "all" in names else checked


def zero_shot_table(results: dict[str, dict]) -> Table:
    """One row per zero-shot task: items scored, accuracy and length-normalized accuracy with stderr."""

    def cell(value: float | None, stderr: float | None) -> str:
        return "—" if value is None else f"{value:.3f} ± {stderr or 0:.3f}"

    table = Table(title="zero-shot (lm-eval, acc ± stderr)")
    for column in ("task", "n", "acc", "acc_norm"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, row in results.items():
        table.add_row(name, str(row["n"]), cell(row["acc"], row["acc_stderr"]),
                      cell(row["acc_norm"], row["acc_norm_stderr"]))  # fmt: skip
    return table


@app.command(name="eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="a bondcut directory, HF directory, .gguf file or alias")],
    context: Annotated[int, typer.Option(help="perplexity window length in tokens")] = 512,
    stride: Annotated[int, typer.Option(help="tokens the window moves by")] = 256,
    max_tokens: Annotated[int, typer.Option(help="held-out tokens to score")] = 8192,
    tasks: Annotated[list[str] | None, typer.Option(help=_TASKS_HELP)] = None,
    task_limit: Annotated[int | None, typer.Option(help="score only the first N items of each task")] = None,
    out: Annotated[Path | None, typer.Option(help="write the report as JSON here")] = None,
    fast: Annotated[
        bool,
        typer.Option(
            help="run each MPO layer the fastest exact way measured here, dense included (same numbers, more RAM)"
        ),
    ] = True,  # fmt: skip
) -> None:
    """Held-out perplexity, greedy generations and optional zero-shot accuracy of a model (original or compressed)."""
    from .cache import atomic_write_text
    from .evaluate import evaluate

    names = _parse_tasks(tasks)
    if names and task_limit is not None and task_limit < 1:
        _fail(f"--task-limit must be a positive number of items, got {task_limit}; e.g. --task-limit 100")
    import bondcut

    net, tokenizer = _load(model, _resolve(model))
    if fast and any(isinstance(m, bondcut.MPOLinear) for m in net.modules()):
        with console.status("choosing each MPO layer's fastest exact inference path"):
            bondcut.tune(net, allow_dense=True)
    with LoggedProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} {task.fields[unit]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:  # fmt: skip
        task = progress.add_task("perplexity", total=None, unit="windows")
        zs_task = progress.add_task("zero-shot", total=None, unit="requests", visible=bool(names))
        try:
            report = evaluate(net, tokenizer, context=context, stride=stride, max_tokens=max_tokens,
                              on_window=lambda done, total: progress.update(task, completed=done, total=total),
                              tasks=names, task_limit=task_limit,
                              on_request=lambda done, total: progress.update(zs_task, completed=done, total=total))  # fmt: skip
        except ValueError as err:
            _fail(str(err))
    ppl = report.perplexity
    console.print(f"perplexity {ppl['perplexity']:.3f} on {ppl['tokens_scored']:,} tokens of {report.corpus} "
                  f"(context {ppl['context']}, stride {ppl['stride']})")  # fmt: skip
    for prompt, text in report.generations.items():
        console.print(f"[bold]{prompt}[/]{text}")
    if report.zero_shot:
        console.print(zero_shot_table(report.zero_shot))
    if out is not None:
        atomic_write_text(out, json.dumps({"model": str(model), **report.to_dict()}, indent=1))
        console.print(f"wrote {out}")


@app.command()
def bench(
    models: Annotated[
        list[str], typer.Argument(help="models to measure: bondcut/HF directories, .gguf files or aliases")
    ],
    baseline: Annotated[
        str | None, typer.Option(help="the original model; every figure is also given as a ratio to it")
    ] = None,
    out: Annotated[Path, typer.Option(help="directory for bench.json, report.md and the PNG plots")] = Path(
        "bench-report"
    ),
    repeats: Annotated[int, typer.Option(help="timed repeats per figure (after warm-up)")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    phases: Annotated[
        str, typer.Option(help="'inference', 'training' or both, comma-separated")
    ] = "inference,training",
    train_params: Annotated[
        str,
        typer.Option(
            help="'all' parameters trainable, only the 'mpo' cores, or 'auto' (mpo where there are MPO layers)"
        ),
    ] = "all",
    tune: Annotated[bool, typer.Option(help="pick each MPO layer's inference merge by measured latency first")] = True,
    allow_dense: Annotated[bool, typer.Option(help="let --tune materialize dense weights (faster, more RAM)")] = False,
    quick: Annotated[bool, typer.Option(help="tiny shapes and 1 repeat: checks the pipeline, not the machine")] = False,
) -> None:
    """Prefill/decode tokens per second, a training step, peak RSS and bytes, with ratios to --baseline."""
    from .bench import BenchSettings
    from .bench import bench as run_bench
    from .report import write_report
    from .timing import write_json

    for name in [*models, *([baseline] if baseline else [])]:
        _resolve(name)
    quick_shapes = {"prefill_tokens": 32, "decode_batches": (1, 2), "decode_new_tokens": 4, "train_batch": 2,
                    "train_seq": 32, "repeats": 1}  # fmt: skip
    shapes = quick_shapes if quick else {"repeats": repeats}
    try:
        settings = BenchSettings(
            threads=threads, train_params=train_params, tune=tune, allow_dense=allow_dense, **shapes
        )
        with LoggedProgress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:  # fmt: skip
            task = progress.add_task("", total=None)

            def on_step(model: str, phase: str, done: int, total: int) -> None:
                progress.update(task, description=f"{phase} {model}", completed=done, total=total)

            report = run_bench(models, baseline=baseline, settings=settings, phases=phases.split(","), on_step=on_step)
    except (ValueError, RuntimeError) as err:
        _fail(str(err))
    write_json(out / "bench.json", report)
    markdown = write_report(out, bench=report)
    for name, ratios in report.get("ratios", {}).items():
        console.print(f"[bold]{name}[/] vs {baseline}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(ratios.items())))
    console.print(f"wrote {out / 'bench.json'} and {markdown}")


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="directory for report.md and its PNG plots")],
    bench_json: Annotated[Path | None, typer.Option("--bench", help="a bench.json written by bondcut bench")] = None,
    eval_json: Annotated[
        list[Path] | None, typer.Option("--eval", help="JSON written by bondcut eval --out (repeat)")
    ] = None,
) -> None:
    """One Markdown report with plots from bench and eval results, models side by side."""
    from .report import write_report

    def read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            _fail(f"{path} does not exist; write it with `bondcut bench --out DIR` or `bondcut eval MODEL --out FILE`")
        except json.JSONDecodeError as err:
            _fail(f"{path} is not JSON ({err}); give the file bondcut bench/eval wrote")

    evals = [read(p) for p in eval_json or []]
    if bench_json is None and not evals:
        _fail("nothing to report: give --bench bench.json and/or --eval eval.json (repeatable)")
    console.print(f"wrote {write_report(out, bench=read(bench_json) if bench_json else None, evals=evals)}")


@app.command(name="profile")
def profile_command(
    model: Annotated[str, typer.Argument(help="HF directory, .gguf file, or alias (smollm2-135m, gemma3-270m)")],
    out: Annotated[Path, typer.Option(help="JSON to write (and resume from); a PNG heatmap goes beside it")] = Path(
        "profile.json"
    ),
    calib: Annotated[int, typer.Option(help="calibration tokens per loss evaluation")] = 512,
    stat_tokens: Annotated[int, typer.Option(help="calibration tokens for the input statistics")] = 16384,
    fractions: Annotated[str, typer.Option(help="kept parameter fractions, comma separated")] = "0.1,0.3",
    sites: Annotated[str, typer.Option(help="a 2-site layout: 'lowrank' or 2 (balanced)")] = "lowrank",
    activation_aware: Annotated[bool, typer.Option(help="decompose as compress --calib-tokens would")] = True,
    include: Annotated[list[str] | None, typer.Option(help="only these modules (name, glob or re:regex)")] = None,
) -> None:
    """Loss increase on calibration text when each SA/MLP matrix alone is compressed, over a grid of sizes."""
    from .profile import profile
    from .report import plot_profile

    try:
        grid = [float(f) for f in fractions.split(",")]
    except ValueError:
        _fail(f"--fractions must be numbers in (0, 1) separated by commas, e.g. 0.1,0.25,0.5; got {fractions!r}")
    net, tokenizer = _load(model, _resolve(model))
    with LoggedProgress(TextColumn("[bold]profile[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:  # fmt: skip
        task = progress.add_task("", total=None)
        try:
            result = profile(net, tokenizer, fractions=grid, sites=_parse_sites(sites), calibration_tokens=calib,
                             covariance_tokens=stat_tokens,
                             activation_aware=activation_aware, include=include, cache=out,
                             on_layer=lambda name, done, total: progress.update(task, description=name, completed=done,
                                                                                total=total))  # fmt: skip
        except ValueError as err:
            _fail(str(err))
    png = plot_profile(result.to_dict(), out.with_suffix(".png"))
    console.print(f"base loss {result.base_loss:.4f} on {calib} calibration tokens; {result.forward_passes} forward "
                  f"passes, {result.seconds:.0f} s; wrote {out} and {png}")  # fmt: skip


@app.command(name="heal")
def heal_command(
    model: Annotated[str, typer.Argument(help="a compressed bondcut directory (or any model, with --train all)")],
    out: Annotated[Path, typer.Option(help="directory to write the healed model to")],
    tokens: Annotated[
        int, typer.Option(help="training tokens in total (one pass over the train split: ~1.1 M)")
    ] = 262_144,
    teacher: Annotated[
        str | None, typer.Option(help="the original model, for distillation (HF directory, .gguf or alias)")
    ] = None,  # fmt: skip
    distill: Annotated[float, typer.Option(help="weight of distillation vs next-token loss, 0..1")] = 0.5,
    temperature: Annotated[float, typer.Option(help="distillation temperature")] = 1.0,
    teacher_top_k: Annotated[
        int,
        typer.Option(
            help="cache the teacher's k largest logits per position on disk, so later runs on the same "
            "data skip the teacher (0 = run it alongside)"
        ),
    ] = 0,  # fmt: skip
    hidden_distill: Annotated[
        float,
        typer.Option(
            help="with --teacher: weight of a term pulling each block's output toward the teacher's (relative "
            "squared error per position; the teacher runs on every batch); 0 = none"
        ),
    ] = 0.0,  # fmt: skip
    seq_len: Annotated[int, typer.Option(help="tokens per training sequence")] = 256,
    batch_size: Annotated[int, typer.Option(help="sequences per optimizer step (all processes together)")] = 8,
    micro_batch: Annotated[int, typer.Option(help="sequences per forward/backward on one process")] = 4,
    lr: Annotated[float, typer.Option(help="peak learning rate (warm-up, then cosine)")] = 1e-4,
    rest_lr: Annotated[
        float | None,
        typer.Option(
            help="with --train all or mpo+dense: peak learning rate of everything outside the MPO layers "
            "(embeddings, norms, dense layers); default --lr"
        ),
    ] = None,  # fmt: skip
    train: Annotated[
        str,
        typer.Option(
            help="'mpo' (cores only), 'mpo+dense' (cores and the linear layers left dense; embeddings and "
            "norms stay), 'all' parameters, 'scales' (a packed model's group scales and offsets; codes stay), "
            "or 'mpo+scales' (cores and scales)"
        ),
    ] = "mpo",
    eval_every: Annotated[int, typer.Option(help="steps between held-out perplexity checks (0 = start and end)")] = 0,
    eval_tokens: Annotated[int, typer.Option(help="held-out tokens per check (0: no checks)")] = 4096,
    checkpoint_every: Annotated[int, typer.Option(help="steps between atomic checkpoints (0 = none)")] = 50,
    resume: Annotated[
        bool, typer.Option(help="continue from the last checkpoint in --out's checkpoint folder")
    ] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(help="recompute activations (less memory)")] = False,
    fsdp: Annotated[
        bool, typer.Option(help="under torchrun, shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    ] = False,
    seed: Annotated[int, typer.Option(help="data order")] = 0,
    first_batch: Annotated[
        int, typer.Option(help="batches of the data order to skip: continue a pass an earlier heal began")
    ] = 0,
    gauge: Annotated[
        str,
        typer.Option(
            help="'canonical' (train the cores as decomposed) or 'balanced' (regauge the MPO cores so both sides "
            "of each bond weigh alike; measured: ahead early in a pass, behind at its end)"
        ),
    ] = "canonical",
    quant_bits: Annotated[
        int,
        typer.Option(
            help="8, 4, 3 or 2: train the MPO cores through their rounding to that width (quantization-aware) and save "
            "them packed; 0 = float cores"
        ),
    ] = 0,
    quant_group_size: Annotated[
        int, typer.Option(help="with --quant-bits: core entries sharing one fp16 scale and offset")
    ] = 64,
    quant_pending: Annotated[
        bool,
        typer.Option(
            help="a model from compress --target-bytes --defer-packing: pack its dense layers and embedding as its "
            "plan says, train the MPO cores through the rounding the plan gives them, save it all packed"
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Retrain a compressed model briefly (LM loss and/or distillation); resumable; DDP or FSDP under torchrun."""
    import bondcut

    from .heal import HealConfig, full_model_state, heal
    from .report import plot_heal

    if out.exists() and not overwrite:
        _fail(f"{out} already exists; pass --overwrite or choose another --out")
    try:
        config = HealConfig(tokens=tokens, seq_len=seq_len, batch_size=batch_size, micro_batch=micro_batch, lr=lr,
                            rest_lr=rest_lr, train=train, distill=distill if teacher else 0.0, temperature=temperature,
                            teacher_top_k=teacher_top_k, hidden_distill=hidden_distill,
                            eval_every=eval_every, eval_tokens=eval_tokens, checkpoint_every=checkpoint_every,
                            gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, seed=seed,
                            first_batch=first_batch, gauge=gauge, quant_bits=quant_bits,
                            quant_group=quant_group_size, quant_pending=quant_pending)  # fmt: skip
    except ValueError as err:
        _fail(str(err))
    net, tokenizer = _load(model, _resolve(model))
    original = _load(teacher, _resolve(teacher))[0] if teacher else None
    checkpoints = out.with_name(f"{out.name}.checkpoint")
    with LoggedProgress(TextColumn("[bold]heal[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as progress:  # fmt: skip
        task = progress.add_task("", total=config.steps)

        def on_step(point: dict) -> None:
            ppl = point["eval"].get("perplexity")
            progress.update(task, completed=point["step"], description=f"loss {point['loss']:.3f} "
                            f"{point['tokens_per_s']:.0f} tok/s" + (f" held-out ppl {ppl:.2f}" if ppl else ""))  # fmt: skip

        try:
            result = heal(net, tokenizer, config, teacher=original, checkpoint_dir=checkpoints, resume=resume,
                          on_step=on_step)  # fmt: skip
        except ValueError as err:
            _fail(str(err))
    from accelerate import PartialState

    state = PartialState()
    gathered = full_model_state(net) if fsdp and state.num_processes > 1 else None  # every process takes part
    if not state.is_main_process:
        return  # one writer
    if gathered is not None:  # the trained model is sharded: pour its gathered weights into a plain copy
        net = _load(model, _resolve(model))[0]
        net.load_state_dict(gathered)
    record = json.dumps(result.to_dict(), indent=1)
    with console.status(f"saving to {out}"):
        bondcut.save(net, out, tokenizer=tokenizer, overwrite=overwrite, extra_files={"heal.json": record})
    plot_heal(result.to_dict(), out / "heal.png")
    shutil.rmtree(checkpoints, ignore_errors=True)  # the healed model is saved; the checkpoint has served
    per_step = config.batch_size * config.seq_len
    if result.evals:
        before, after = result.evals[0], result.evals[-1]
        console.print(
            f"held-out perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
            f"({after['tokens_scored']:,} tokens, context {after['context']}, stride {after['stride']})"
        )
    console.print(f"{result.steps} steps x {per_step:,} tokens = {result.steps * per_step:,} tokens "
                  f"({result.steps * per_step / result.train_tokens_per_pass:.2f} passes over "
                  f"the train split) in {result.seconds:.0f} s on {result.processes} process(es); "
                  f"trainable {result.trainable_params:,} params, AdamW state {result.optimizer_state_bytes / 1e6:.0f} MB")  # fmt: skip
    console.print(f"saved to {out} (curve: heal.json, heal.png)")


@app.command(name="quantize")
def quantize_command(
    model: Annotated[str, typer.Argument(help="a bondcut directory (compressed or healed), HF directory or alias")],
    out: Annotated[Path, typer.Option(help="directory to write the quantized model to")],
    bits: Annotated[
        int,
        typer.Option(help="8, 4, 3 or 2 bits per weight (group-wise scales, stored packed; 8 and 4 have CPU kernels)"),
    ] = 4,
    group_size: Annotated[
        int,
        typer.Option(
            help="weights sharing one fp16 scale and offset; 0: one per row "
            "(int8 then runs on PyTorch's int8 CPU kernel)"
        ),
    ] = 64,
    cores: Annotated[bool, typer.Option(help="also pack the MPO cores (default: only what is not an MPO)")] = False,
    embeddings: Annotated[bool, typer.Option(help="pack the token embedding and the LM head")] = True,
    method: Annotated[
        str,
        typer.Option(
            help="Linear layers: 'rtn' (round to nearest) or 'gptq' (activation-aware, on calibration "
            "text; same file format)"
        ),
    ] = "rtn",  # fmt: skip
    calibration_tokens: Annotated[int, typer.Option(help="gptq: calibration tokens")] = 16384,
    rotate: Annotated[
        bool,
        typer.Option(
            help="Linear layers: store W R^T and rotate inputs by R, a random block Hadamard (less rounding "
            "error, most at 3-4 bits; one small product per input at run time)"
        ),
    ] = False,  # fmt: skip
    embedding_tiers: Annotated[
        str | None,
        typer.Option(
            help="pack the embedding's rows at several widths, the most used (on the train split) finest: "
            "bits:share, most used first, e.g. 8:0.1,4:0.4,3:0.5 (default: every row at --bits)"
        ),
    ] = None,  # fmt: skip
    pending: Annotated[
        bool,
        typer.Option(
            help="apply the per-layer packing that compress --target-bytes --defer-packing left "
            "(its bits and rounding; --bits, --method and the rest are then not used)"
        ),
    ] = False,  # fmt: skip
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Weight-only int8/int4 for embeddings, LM head and non-tensorized Linear layers (optionally MPO cores)."""
    import bondcut

    from .quant import QuantizeConfig, quantize_model

    if out.exists() and not overwrite:
        _fail(f"{out} already exists; pass --overwrite or choose another --out")
    try:
        config = QuantizeConfig(bits=bits, group_size=group_size, cores=cores, embeddings=embeddings, method=method,
                                calibration_tokens=calibration_tokens, rotate=rotate,
                                embedding_tiers=embedding_tiers)  # fmt: skip
    except ValueError as err:
        _fail(str(err))
    source = _resolve(model)
    net, tokenizer = _load(model, source)
    if pending:
        _pack_pending(net, tokenizer, calibration_tokens, model, source, out, overwrite)
        return
    gptq_note = " (gptq: calibration statistics first)" if method == "gptq" else ""
    tiers_note = f", the embedding's rows in tiers {embedding_tiers}" if embedding_tiers else ""
    with console.status(f"packing to {bits} bits{gptq_note}{tiers_note}"):
        report = quantize_model(net, config, tokenizer=tokenizer)
    with console.status(f"saving to {out}"):
        bondcut.save(net, out, tokenizer=tokenizer, overwrite=overwrite)
    table = Table(title=f"{model} -> {out}: weight bytes by kind")
    for column in ("kind", "before MB", "after MB", "after / before"):
        table.add_column(column, justify="right" if column != "kind" else "left")
    for kind, before in report.bytes_before.items():
        after = report.bytes_after[kind]
        table.add_row(kind, f"{before / 1e6:.1f}", f"{after / 1e6:.1f}", f"{after / before:.3f}")
    console.print(table)
    if embedding_tiers:
        console.print(f"embedding rows in tiers (bits:share, most used first): {embedding_tiers}")
    _say_file_sizes(source, out)


def _say_file_sizes(source, out: Path) -> None:
    """Print the weight file's size before and after, and where it went."""
    from .sizes import directory_weight_bytes

    before, after = directory_weight_bytes(source), directory_weight_bytes(out)
    console.print(f"weight file {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / before:.1%}); "
                  f"saved to {out}")  # fmt: skip


def _pack_pending(net, tokenizer, calibration_tokens: int, name: str, source, out: Path, overwrite: bool) -> None:
    """quantize --pending: pack what the deferred joint plan names, save, and say what it became."""
    import bondcut

    from .hf_integration import pending_packing
    from .joint import apply_pending_packing, precision_text

    packing = pending_packing(net)
    if packing is None:
        _fail(f"{name} has no pending packing: make one with bondcut compress MODEL --target-bytes SIZE "
              "--defer-packing (or quantize without --pending)")  # fmt: skip
    bits = sorted(set(packing["layers"].values()))
    with console.status(f"packing {len(packing['layers'])} matrices ({packing['rounding']}, bits {bits}), "
                        f"embedding {precision_text(packing['embedding_bits'])}"):  # fmt: skip
        apply_pending_packing(net, tokenizer, calibration_tokens)
    with console.status(f"saving to {out}"):
        bondcut.save(net, out, tokenizer=tokenizer, overwrite=overwrite)
    _say_file_sizes(source, out)


@app.command(name="compare")
def compare_command(
    model: Annotated[str, typer.Argument(help="the original model: HF directory, .gguf file or alias")],
    out: Annotated[Path, typer.Option(help="directory for models, results, compare.md/json/png (resumable)")],
    ratio: Annotated[
        float, typer.Option(help="kept fraction of the SA+MLP parameters for the structural methods")
    ] = 0.5,
    heal_tokens: Annotated[int, typer.Option(help="healing budget per trained method (0 = no healing)")] = 65536,
    heal_lr: Annotated[float, typer.Option(help="peak learning rate of healing")] = 2e-4,
    scale_lr: Annotated[
        float, typer.Option(help="peak learning rate where packed models heal their group scales and offsets")
    ] = 3e-4,
    finetune_lr: Annotated[
        float, typer.Option(help="peak learning rate of original_tuned (the original, all parameters trained)")
    ] = 5e-5,
    joint_healing: Annotated[
        str,
        typer.Option(
            help="joint: 'float' (heal the MPO cores, then pack), 'packed' (pack, then heal scales) or 'aware' "
            "(pack the rest, heal the cores through their rounding beside the scales)"
        ),
    ] = "aware",
    distill: Annotated[float, typer.Option(help="distillation weight in healing (teacher: the original)")] = 0.0,
    eval_tokens: Annotated[int, typer.Option(help="held-out tokens for perplexity")] = 8192,
    tasks: Annotated[list[str] | None, typer.Option(help=_TASKS_HELP + " (default: none)")] = None,
    task_limit: Annotated[int | None, typer.Option(help="items per zero-shot task (default: all)")] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="'all' or a comma list of original,original_tuned,int8,int4,int4_gptq,svd,svd_llm,layerchop,bondcut,"
            "bondcut_int4,joint"
        ),
    ] = "all",
    search: Annotated[int, typer.Option(help="bondcut's search evaluations")] = 48,
    chop_rule: Annotated[str, typer.Option(help="LayerChop's block choice: 'measured' (KL) or 'deepest'")] = "measured",
    quantize_cores: Annotated[bool, typer.Option(help="bondcut_int4 also packs the MPO cores")] = False,
    rounding: Annotated[
        str, typer.Option(help="rounding of bondcut_int4's and joint's packed weights: 'gptq' or 'rtn'")
    ] = "gptq",
    rotate: Annotated[
        bool,
        typer.Option(help="packed rows (int8/int4, bondcut_int4, joint): dense layers rotate their inputs first"),
    ] = False,
    threads: Annotated[int, typer.Option(help="threads for the speed measurements")] = 2,
    bench_repeats: Annotated[int, typer.Option(help="timed repeats per speed figure (median reported)")] = 3,
    bench_train_batch: Annotated[int, typer.Option(help="sequences of 256 tokens per timed training step")] = 8,
    target_bytes: Annotated[
        str | None,
        typer.Option(
            help="the joint method's budget, e.g. 60MB or 10% of the fp32 weights (default: bondcut_int4's size)"
        ),
    ] = None,
    joint_blocks: Annotated[int, typer.Option(help="blocks the joint method may delete")] = 4,
    joint_rounding_weight: Annotated[
        float | None,
        typer.Option(help="joint: weight of rounding damage against truncation's in its plan (0.3 when healing)"),
    ] = None,
    joint_bits: Annotated[
        str, typer.Option(help="joint: packed widths its search may use, e.g. 8,4,3 (3/2 bits dequantize per call)")
    ] = "8,4",
    joint_objective: Annotated[
        str, typer.Option(help="joint: what its search minimizes, 'kl' (to the original) or 'nll' (of the text)")
    ] = "kl",
) -> None:
    """Original vs int8 vs int4 vs truncated SVD vs aware low rank vs LayerChop vs bondcut (and + int4): one table."""
    from .compare import METHODS, CompareConfig, compare
    from .joint import parse_budget

    chosen = METHODS if methods == "all" else tuple(m.strip() for m in methods.split(",") if m.strip())
    try:
        config = CompareConfig(rounding=rounding, rotate=rotate, ratio=ratio, heal_tokens=heal_tokens, heal_lr=heal_lr, distill=distill,
                               scale_lr=scale_lr, finetune_lr=finetune_lr, joint_healing=joint_healing,
                               eval_tokens=eval_tokens, tasks=_parse_tasks(tasks),
                               task_limit=task_limit, methods=chosen,
                               search_evaluations=search, chop_rule=chop_rule, quantize_cores=quantize_cores,
                               threads=threads, bench_repeats=bench_repeats,
                               bench_train_batch=bench_train_batch, joint_blocks=joint_blocks,
                               joint_rounding_weight=joint_rounding_weight,
                               joint_bits=_parse_int_list(joint_bits, "--joint-bits", "8,4,3"),
                               joint_objective=joint_objective,
                               target_bytes=None if target_bytes is None else parse_budget(target_bytes))  # fmt: skip
    except ValueError as err:
        _fail(str(err))
    _resolve(model)

    def on_stage(method: str, stage: str) -> None:
        console.print(f"[bold]{method}[/]: {stage}")

    def on_bench(name: str, phase: str, done: int, total: int) -> None:
        if name:
            console.print(f"speed {done + 1}/{total}: {phase} of {Path(name).name}")

    try:
        compare(model, out, config, on_stage=on_stage, on_bench=on_bench)
    except ValueError as err:
        _fail(str(err))
    console.print((out / "compare.md").read_text())
    console.print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
