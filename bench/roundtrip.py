"""Full-chi round trip and end-to-end compress on the shipped default model.

Measures, in one run:
- full chi (no truncation) on every SA/MLP matrix: max |logits - original| on 512 held-out tokens (target <= 1e-4),
  in fp32 and, to separate the algebra from fp32 rounding, with the whole model in fp64;
- ``compress(ratio=0.5)`` (default balanced layout) and ``ratio=0.5, sites="lowrank"``: wall time, params, and
  the save -> fresh ``from_pretrained`` reload max |logits diff| (target <= 1e-5), file sizes.

Run: ``python bench/roundtrip.py`` (~17 min on 2 cores; the fp64 full-chi forward alone takes ~10). Writes bench/results/roundtrip.json.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import base_parser, environment, write_json

import bondcut
from bondcut.corpus import split_text
from bondcut.sizes import directory_weight_bytes


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def tail_quantile(values: torch.Tensor, q: float = 0.9999) -> float:
    """q-quantile of a large tensor (torch.quantile takes at most 2^24 values: subsample evenly)."""
    flat = values.flatten()
    step = -(-flat.numel() // 2**24)  # ceil division
    return flat[::step].float().quantile(q).item()


def reload_diff(model, tokenizer, ids, reference) -> dict:
    """Save, reload in a fresh process with transformers' own from_pretrained, compare logits."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        bondcut.save(model, path, tokenizer=tokenizer)
        torch.save({"ids": ids, "logits": reference}, Path(tmp) / "ref.pt")
        code = (
            "import torch, bondcut; from transformers import AutoModelForCausalLM as A\n"
            f"r = torch.load({str(Path(tmp) / 'ref.pt')!r}); m = A.from_pretrained({str(path)!r})\n"
            "with torch.inference_mode(): print('DIFF', (m(r['ids']).logits - r['logits']).abs().max().item())"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return {"reload_max_abs_logit_diff": float(out.split("DIFF")[1]), "weights_bytes": directory_weight_bytes(path)}


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], "roundtrip.json")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    original, tokenizer = bondcut.load(args.model)
    ids = tokenizer(split_text("heldout", genres="a"), return_tensors="pt").input_ids[:, : args.tokens]
    reference = logits(original, ids)
    results = {
        "benchmark": "roundtrip",
        "model": args.model,
        "tokens": args.tokens,
        "environment": environment(args.threads),
    }
    results["original_weights_bytes"] = directory_weight_bytes(bondcut.resolve_model(args.model))

    fp64, ids64 = copy.deepcopy(original).double(), ids
    reference64 = logits(fp64, ids64)
    bondcut.compress(fp64, bondcut.CompressConfig(chi=10**6))
    results["full_chi_fp64_max_abs_logit_diff"] = (logits(fp64, ids64) - reference64).abs().max().item()
    print("full chi fp64", results["full_chi_fp64_max_abs_logit_diff"], flush=True)
    del fp64

    for name, config in {
        "full_chi": bondcut.CompressConfig(chi=10**6),
        "ratio_0.5_auto": bondcut.CompressConfig(ratio=0.5, allocation="uniform"),
        "ratio_0.5_lowrank": bondcut.CompressConfig(ratio=0.5, sites="lowrank", allocation="uniform"),
    }.items():
        model = copy.deepcopy(original)
        start = time.perf_counter()
        report = bondcut.compress(model, config)
        seconds = time.perf_counter() - start
        out = logits(model, ids)
        entry = {
            "compress_seconds": seconds,
            "uniform_chi": report.uniform_chi,
            "target_params_before": report.target_params_before,
            "target_params_after": report.target_params_after,
            "model_params_before": report.model_params_before,
            "model_params_after": report.model_params_after,
            "max_abs_logit_diff_vs_original": (out - reference).abs().max().item(),
            "p99.99_abs_logit_diff_vs_original": tail_quantile((out - reference).abs()),
            "max_abs_original_logit": reference.abs().max().item(),
            **reload_diff(model, tokenizer, ids, out),
        }
        results[name] = entry
        print(name, entry, flush=True)
        del model
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
