"""The ``bondcut`` command line: each command parses, calls the library, prints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make causal LMs small with MPOs, and prove it.")
# wide enough for module names when output is piped (rich defaults to 80 columns off a terminal)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


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
    chi: Annotated[Optional[int], typer.Option(help="max bond dimension for every layer")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="fraction of SA+MLP parameters to keep, e.g. 0.5")] = None,
    tol: Annotated[Optional[float], typer.Option(help="relative Frobenius error per matrix")] = None,
    sites: Annotated[str, typer.Option(help="'auto', 'lowrank' or a number of sites")] = "auto",
    include: Annotated[Optional[list[str]], typer.Option(help="only these modules (name, glob or re:regex)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="skip these modules (name, glob or re:regex)")] = None,
    modules: Annotated[Optional[list[str]], typer.Option(help="explicit modules, for unsupported architectures")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Replace the self-attention and MLP matrices by MPOs and save the model."""
    import bondcut

    from .config import CompressConfig
    from .sizes import directory_weight_bytes

    if out.exists() and not overwrite:
        _fail(f"{out} already exists; pass --overwrite or choose another --out")
    try:
        config = CompressConfig(
            chi=chi, ratio=ratio, tol=tol, sites=_parse_sites(sites), include=include,
            exclude=exclude or [], modules=modules,
        )  # fmt: skip
    except ValueError as err:
        _fail(str(err))
    source = _resolve(model)
    net, tokenizer = _load(model, source)
    with Progress(
        TextColumn("[bold]compressing"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("", total=None)

        def on_layer(layer, index: int, total: int) -> None:
            progress.update(task, total=total, completed=index + 1, description=f"{layer.name} chi={layer.bond_dims}")

        try:
            report = bondcut.compress(net, config, on_layer=on_layer)
        except ValueError as err:
            _fail(str(err))
    with console.status(f"saving to {out}"):
        bondcut.save(net, out, tokenizer=tokenizer, overwrite=overwrite,
                     extra_files={"bondcut_report.json": json.dumps(report.to_dict(), indent=1)})  # fmt: skip
    console.print(summary_table(report, directory_weight_bytes(source), directory_weight_bytes(out)))
    console.print(f"saved to {out}")


def summary_table(report, bytes_before: int, bytes_after: int) -> Table:
    """Before/after table: compressed layers, whole model, file size."""
    from .sizes import percent_removed

    table = Table(title=f"bondcut compress ({len(report.layers)} matrices, uniform chi={report.uniform_chi})")
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
        m, n = layout["shape"]
        ranks = [1, *layout["bond_dims"], 1]
        params = sum(ranks[i] * a * b * ranks[i + 1] for i, (a, b) in enumerate(layout["sites"]))
        total_dense, total_mpo = total_dense + m * n, total_mpo + params
        sites = "".join(f"({a}x{b})" for a, b in layout["sites"])
        table.add_row(name, f"{m}x{n}", sites, str(layout["bond_dims"]), f"{params:,}", f"{params / (m * n):.3f}")
    table.add_row("total", "", "", "", f"{total_mpo:,}", f"{total_mpo / total_dense:.3f}")
    console.print(table)


@app.command(name="eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="a bondcut directory, HF directory, .gguf file or alias")],
    context: Annotated[int, typer.Option(help="perplexity window length in tokens")] = 512,
    stride: Annotated[int, typer.Option(help="tokens the window moves by")] = 256,
    max_tokens: Annotated[int, typer.Option(help="held-out tokens to score")] = 8192,
    out: Annotated[Optional[Path], typer.Option(help="write the report as JSON here")] = None,
) -> None:
    """Held-out perplexity and greedy generations of a model (original or compressed)."""
    from .cache import atomic_write_text
    from .evaluate import evaluate

    net, tokenizer = _load(model, _resolve(model))
    with Progress(TextColumn("[bold]perplexity"), BarColumn(), TextColumn("{task.completed}/{task.total} windows"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:  # fmt: skip
        task = progress.add_task("", total=None)
        try:
            report = evaluate(net, tokenizer, context=context, stride=stride, max_tokens=max_tokens,
                              on_window=lambda done, total: progress.update(task, completed=done, total=total))  # fmt: skip
        except ValueError as err:
            _fail(str(err))
    ppl = report.perplexity
    console.print(f"perplexity {ppl['perplexity']:.3f} on {ppl['tokens_scored']:,} tokens of {report.corpus} "
                  f"(context {ppl['context']}, stride {ppl['stride']})")  # fmt: skip
    for prompt, text in report.generations.items():
        console.print(f"[bold]{prompt}[/]{text}")
    if out is not None:
        atomic_write_text(out, json.dumps({"model": str(model), **report.to_dict()}, indent=1))
        console.print(f"wrote {out}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
