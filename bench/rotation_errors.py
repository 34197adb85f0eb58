"""Packing error with and without input rotation (``QuantizeConfig(rotate=True)``), per matrix type and depth.

For each chosen matrix: the relative output error ||X (W - Q)^T||^2 / ||X W^T||^2 on calibration inputs (from the
Gram matrix X^T X) of W packed to each width, rounded to nearest and by GPTQ, plain and with the inputs rotated by
a random block Hadamard first (the error read in the original basis). Writes JSON and a bar chart of the GPTQ
errors.

    python bench/rotation_errors.py --blocks 2,15,28 --bits 3,4 --group-size 128
"""

from __future__ import annotations

import torch
from _common import base_parser, module_type, write_json

from bondcut.calibration import input_covariances
from bondcut.models import load_model
from bondcut.quant.gptq import quantize_aware
from bondcut.quant.packing import dequantize, quantize
from bondcut.quant.rotation import rotate, rotate_gram, rotation_block, rotation_signs, unrotate
from bondcut.report import pyplot, save_figure

TYPES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def output_error(weight: torch.Tensor, rounded: torch.Tensor, gram: torch.Tensor) -> float:
    d, w, g = (weight - rounded).double(), weight.double(), gram.double()
    return float(torch.trace(d @ g @ d.T) / torch.trace(w @ g @ w.T))


def errors_of(weight: torch.Tensor, gram: torch.Tensor, bits: int, group: int) -> dict[str, float]:
    signs, block = rotation_signs(weight.shape[1]), rotation_block(weight.shape[1])
    rotated, rotated_gram = rotate(weight, signs, block), rotate_gram(gram, signs, block)
    back = lambda packed: unrotate(dequantize(packed), signs, block)  # noqa: E731
    return {
        "rtn": output_error(weight, dequantize(quantize(weight, bits, group)), gram),
        "gptq": output_error(weight, dequantize(quantize_aware(weight, gram, bits, group)), gram),
        "rtn_rotated": output_error(weight, back(quantize(rotated, bits, group)), gram),
        "gptq_rotated": output_error(weight, back(quantize_aware(rotated, rotated_gram, bits, group)), gram),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue7/rotation_output_errors.json")
    parser.add_argument("--blocks", default="2,15,28", help="transformer blocks to measure, comma-separated")
    parser.add_argument("--bits", default="3,4", help="packed widths, comma-separated")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens for the Gram matrices")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    blocks, widths = [int(b) for b in args.blocks.split(",")], [int(b) for b in args.bits.split(",")]
    names = [f"model.layers.{b}.{t}" for b in blocks for t in TYPES]
    grams = input_covariances(model, tokenizer, names, tokens=args.tokens)[0]
    rows = []
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        for bits in widths:
            row = {"matrix": name, "type": module_type(name), "bits": bits, "group_size": args.group_size}
            rows.append({**row, **errors_of(weight, grams[name], bits, args.group_size)})
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    summary = {}
    for bits in widths:
        at = [r for r in rows if r["bits"] == bits]
        summary[bits] = {k: sum(r[k] for r in at) / len(at) for k in ("rtn", "gptq", "rtn_rotated", "gptq_rotated")}
    write_json(args.out, {"what": __doc__.splitlines()[0], "model": args.model, "calibration_tokens": args.tokens,
                          "rows": rows, "mean_by_bits": summary})  # fmt: skip
    plt = pyplot()
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4), squeeze=False, layout="constrained")
    for ax, bits in zip(axes[0], widths):
        at = [r for r in rows if r["bits"] == bits]
        x = torch.arange(len(at)).numpy()
        ax.bar(x - 0.2, [r["gptq"] for r in at], 0.4, label="GPTQ")
        ax.bar(x + 0.2, [r["gptq_rotated"] for r in at], 0.4, label="GPTQ, inputs rotated")
        ax.set_xticks(x, [f"{r['type']} {r['matrix'].split('.')[2]}" for r in at], rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{bits} bits, groups of {args.group_size}: relative output error")
        ax.legend()
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
