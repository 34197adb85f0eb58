"""What packing a tied token embedding in row tiers costs against one width: bytes and KL to the original per token.

``bondcut quantize --embedding-tiers 8:0.1,4:0.9`` packs the rows used most (counted on the train split, ties by the
model's predicted probability: :func:`bondcut.quant.tiers.corpus_usage`) at the first width and the rest at the
next ones. Each variant rounds the table as packing does (:func:`bondcut.quant.apply.rounded_table` per width,
GPTQ for the tied head's inputs, optionally rotated rows) and is measured, table alone packed, on calibration text
the head's statistics did not see. Writes JSON and a bytes-vs-KL plot.

    python bench/row_tiers.py --tiers 4:1 3:1 8:0.1,4:0.9 8:0.1,4:0.4,3:0.5 --rotate
"""

from __future__ import annotations

import time

import torch
from _common import add_tied_table_arguments, base_parser, load_tied_table, write_json

from bondcut.divergence import kl_per_position, next_token_logprobs
from bondcut.quant.apply import rounded_table
from bondcut.quant.tiers import RowTiers, corpus_usage, tiered_values
from bondcut.report import pyplot, save_figure


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue7/row_tiers.json")
    parser.add_argument("--tiers", nargs="+", default=["4:1", "3:1", "8:0.1,4:0.9", "8:0.1,4:0.4,3:0.5"],
                        help="row tiers to measure (bits:share, most used first); '4:1' is plain int4")  # fmt: skip
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rotate", action="store_true", help="rotated rows (as quantize --rotate packs them)")
    add_tied_table_arguments(parser)
    args = parser.parse_args()
    model, tokenizer, gram, windows = load_tied_table(args)
    reference = next_token_logprobs(model, windows, batch=4)
    weight = model.get_input_embeddings().weight
    table = weight.detach().clone()
    began = time.perf_counter()
    usage = corpus_usage(model, tokenizer)
    usage_seconds = time.perf_counter() - began
    tiers = [RowTiers.parse(t) for t in args.tiers]
    widths = sorted({b for t in tiers for b in t.widths})
    rounded = {b: rounded_table(table, b, args.group_size, gram, args.rotate) for b in widths}
    fp32_bytes = table.numel() * 4
    rows = []
    for t in tiers:
        with torch.no_grad():
            weight.copy_(tiered_values(rounded, t.assign(usage), t))
        try:
            kl = kl_per_position(reference, next_token_logprobs(model, windows, batch=4)).mean(-1)  # per window
        finally:
            with torch.no_grad():
                weight.copy_(table)
        nbytes = t.nbytes(*table.shape, args.group_size)
        row = {"tiers": str(t), "bytes": nbytes, "bits_per_weight": 8 * nbytes / table.numel(),
               "share_of_fp32": nbytes / fp32_bytes, "kl": float(kl.mean()),
               "kl_se": float(kl.std() / len(kl) ** 0.5)}  # fmt: skip
        rows.append(row)
        print({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    write_json(args.out, {"what": __doc__.splitlines()[0], "model": args.model, "group_size": args.group_size,
                          "rotate": args.rotate, "kl_tokens": args.tokens, "gram_tokens": args.gram_tokens,
                          "usage_seconds": usage_seconds, "rows": rows})  # fmt: skip
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for r in rows:
        ax.scatter(r["bytes"] / 1e6, r["kl"])
        ax.annotate(r["tiers"], (r["bytes"] / 1e6, r["kl"]), fontsize=8)
    ax.set_xlabel("embedding bytes (MB)")
    ax.set_ylabel("KL to the original per token (table alone packed)")
    ax.set_title(f"{args.model}: tied embedding in row tiers, groups of {args.group_size}")
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
