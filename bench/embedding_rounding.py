"""What packing the tied token embedding costs, by role (lookup, LM head, both) and by rounding (nearest or GPTQ
for the head's inputs, plain or with rotated rows), as KL to the original per token.

SmolLM2-135M ties its 49,152 x 576 embedding to the LM head: one table, 21 % of the weights, read two ways. Each
variant packs the table as :func:`bondcut.quant.apply.rounded_table` does (what ``bondcut quantize`` stores and
the joint search measures) and measures KL on calibration text the head's statistics did not see. "lookup only"
and "head only" untie the two for the measurement (the other side keeps the float table). Writes JSON and a bar
chart.

    python bench/embedding_rounding.py --bits 4,3 --group-sizes 64
"""

from __future__ import annotations

import torch
from _common import add_tied_table_arguments, base_parser, load_tied_table, write_json
from torch import nn

from bondcut.divergence import kl_per_position, next_token_logprobs
from bondcut.quant.apply import rounded_table
from bondcut.report import pyplot, save_figure

ROUNDINGS = ("rtn", "gptq", "rtn_rotated", "gptq_rotated")
ROLES = ("tied", "lookup_only", "head_only")


class TableSwap:
    """Measure the model with its lookup table and head weight set apart, then put the tied float table back."""

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model, self.windows = model, windows
        self.table = model.get_input_embeddings().weight.detach().clone()
        self.reference = next_token_logprobs(model, windows)

    def kl(self, lookup: torch.Tensor, head: torch.Tensor) -> float:
        embedding, lm_head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        embedding.weight, lm_head.weight = nn.Parameter(lookup.clone()), nn.Parameter(head.clone())
        try:
            return float(kl_per_position(self.reference, next_token_logprobs(self.model, self.windows)).mean())
        finally:
            embedding.weight = nn.Parameter(self.table.clone())
            lm_head.weight = embedding.weight


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue7/embedding_rounding.json")
    parser.add_argument("--bits", default="4,3", help="packed widths, comma-separated")
    parser.add_argument("--group-sizes", default="64", help="group sizes, comma-separated")
    add_tied_table_arguments(parser)
    args = parser.parse_args()
    model, _, gram, windows = load_tied_table(args)
    swap = TableSwap(model, windows)
    table, rows = swap.table, []
    for group in [int(g) for g in args.group_sizes.split(",")]:
        for bits in [int(b) for b in args.bits.split(",")]:
            for rounding in ROUNDINGS:
                aware, rotate = rounding.startswith("gptq"), rounding.endswith("rotated")
                rounded = rounded_table(table, bits, group, gram if aware else None, rotate)
                row = {"bits": bits, "group_size": group, "rounding": rounding,
                       "relative_error": float((rounded - table).norm() / table.norm()),
                       "tied": swap.kl(rounded, rounded), "lookup_only": swap.kl(rounded, table),
                       "head_only": swap.kl(table, rounded)}  # fmt: skip
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    write_json(args.out, {"what": __doc__.splitlines()[0], "model": args.model, "kl_tokens": args.tokens,
                          "gram_tokens": args.gram_tokens, "rows": rows})  # fmt: skip
    plt = pyplot()
    settings = sorted({(r["bits"], r["group_size"]) for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False, layout="constrained")
    for ax, (bits, group) in zip(axes[0], settings):
        at = [r for r in rows if (r["bits"], r["group_size"]) == (bits, group)]
        x = torch.arange(len(ROLES)).numpy()
        for i, r in enumerate(at):
            ax.bar(x + (i - 1.5) * 0.2, [r[role] for role in ROLES], 0.2, label=r["rounding"].replace("_", ", "))
        ax.set_xticks(x, [role.replace("_", " ") for role in ROLES])
        ax.set_title(f"int{bits}, groups of {group}: KL to the original per token")
        ax.legend()
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
