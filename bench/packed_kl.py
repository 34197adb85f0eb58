"""KL to the original per token of saved (packed, compressed) models, on unseen calibration text and held-out text.

Perplexity scores a model against the text; the joint search minimizes KL to the original. This measures both
(KL, and the NLL of the text per token: log perplexity, over whole windows without a stride) on the models a search
produced, to check what the search measured (its 1,024 tokens) against more text,
with a standard error over 512-token windows, and each later model's paired difference to the first (same
windows: the test between two models). Writes JSON.

    python bench/packed_kl.py Q4RE JGEP --out bench/results/issue7/packed_kl.json
"""

from __future__ import annotations

import torch
from _common import base_parser, write_json

import bondcut
from bondcut.calibration import calibration_windows, unseen_calibration_windows
from bondcut.corpus import split_text
from bondcut.divergence import kl_per_position, next_token_logprobs, paired_difference, token_nll


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue7/packed_kl.json")
    parser.add_argument("models", nargs="+", help="saved model directories to compare with --model")
    parser.add_argument("--tokens", default="1024,8192", help="unseen calibration token counts (default 1024,8192)")
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--genres", default="a", help="held-out genres (default a: press, as bondcut eval)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    original, tokenizer = bondcut.load(args.model)
    texts = {
        f"unseen_calibration_{n}": unseen_calibration_windows(tokenizer, int(n), 512) for n in args.tokens.split(",")
    }
    texts[f"heldout_{args.heldout_tokens}"] = calibration_windows(tokenizer, args.heldout_tokens, 512,
                                                                 split_text("heldout", genres=args.genres))  # fmt: skip
    references = {name: next_token_logprobs(original.eval(), windows, 2) for name, windows in texts.items()}
    results, first = {}, {}
    for path in args.models:
        model, _ = bondcut.load(path)
        results[path] = {}
        for name, windows in texts.items():
            ref = references[name]
            logprobs = next_token_logprobs(model.eval(), windows, 2)
            per_window = {"kl": kl_per_position(ref, logprobs).mean(-1), "nll": token_nll(logprobs, windows).mean(-1)}
            row = {}
            for measure, values in per_window.items():
                row[measure] = float(values.mean())
                row[f"{measure}_se"] = float(values.std() / len(values) ** 0.5)
                if name in first:
                    mean, se = paired_difference(first[name][measure], values)
                    row[f"{measure}_minus_{args.models[0]}"] = {"mean": mean, "se": se}
            first.setdefault(name, per_window)
            results[path][name] = row
        print(path, results[path], flush=True)
        del model
    write_json(args.out, {"what": __doc__.splitlines()[0], "original": args.model, "results": results})


if __name__ == "__main__":
    main()
