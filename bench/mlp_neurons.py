"""Gated MLPs as low rank vs as neuron selections at the same parameters: per-MLP output error on unseen text.

    python bench/mlp_neurons.py M70 --layers 5 13 20 26 --out bench/results/issue6/mlp_neurons_m70.json

For each named block of a compressed bondcut directory whose MLP the plan compressed, rebuilds that MLP from the
original's weights two ways within the parameters the plan gave it: the plan's activation-aware low rank (each
compressed matrix at its chi, the down projection whitened on the hidden activations the compressed gate/up give)
and :mod:`bondcut.neurons`'s selection (energy score, least-squares down refit), also without the refit. Statistics
on --tokens calibration tokens, errors ||y_hat - y|| / ||y|| of the MLP's output on --test-tokens unseen ones (the
split's end), the original's inputs fed to both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _common import base_parser, environment, write_json

from bondcut import load
from bondcut.calibration import calibration_windows, unseen_calibration_windows
from bondcut.mpo.decompose import cores_to_dense
from bondcut.mpo.whiten import decompose_whitened
from bondcut.neurons import neurons_for, select_neurons


def mlp_inputs(model, block: int, windows: torch.Tensor) -> torch.Tensor:
    """(tokens, d) fp64 inputs of block ``block``'s MLP over ``windows``."""
    seen = []
    mlp = model.model.layers[block].mlp
    hook = mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    hook.remove()
    return torch.cat(seen).double()


def compare_block(original, layers: dict, block: int, fit: torch.Tensor, test: torch.Tensor) -> dict:
    """Errors of the plan's low rank and of neuron selection (with and without the refit) for one block's MLP."""
    mlp = original.model.layers[block].mlp
    names = {k: f"model.layers.{block}.mlp.{k}" for k in ("gate_proj", "up_proj", "down_proj")}
    w = {k: getattr(mlp, k).weight.detach().double() for k in names}

    def silu_gate(x, gate, up):  # (tokens, h) hidden activations
        return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)

    def low_rank(key: str, cov: torch.Tensor) -> tuple[torch.Tensor, int]:
        layout = layers.get(names[key])
        if layout is None:
            return w[key], w[key].numel()
        chi = layout["bond_dims"][0]
        mpo = decompose_whitened(w[key], cov, sites="lowrank", chi=chi)
        return cores_to_dense(mpo.cores).double().reshape(w[key].shape), chi * sum(w[key].shape)

    x, x_test = fit, test
    gate, p_gate = low_rank("gate_proj", x.T @ x)
    up, p_up = low_rank("up_proj", x.T @ x)
    hidden = silu_gate(x, gate, up)
    down, p_down = low_rank("down_proj", hidden.T @ hidden)
    want = silu_gate(x_test, w["gate_proj"], w["up_proj"]) @ w["down_proj"].T

    def error(y: torch.Tensor) -> float:
        return float(torch.linalg.norm(y - want) / torch.linalg.norm(want))

    params = p_gate + p_up + p_down
    keep = neurons_for(params, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    true_hidden = silu_gate(x, w["gate_proj"], w["up_proj"])
    narrowed = select_neurons(w["gate_proj"], w["up_proj"], w["down_proj"], true_hidden.T @ true_hidden, keep)
    kept_test = silu_gate(x_test, narrowed.gate, narrowed.up)
    return {
        "block": block,
        "params_kept": params / sum(t.numel() for t in w.values()),
        "neurons_kept": keep,
        "low_rank_chi": {k: layers[n]["bond_dims"][0] for k, n in names.items() if n in layers},
        "error_low_rank": error(silu_gate(x_test, gate, up) @ down.T),
        "error_neurons": error(kept_test @ narrowed.down.T),
        "error_neurons_without_refit": error(kept_test @ w["down_proj"][:, narrowed.kept].T),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue6/mlp_neurons.json")
    parser.add_argument("compressed", type=Path, help="a bondcut directory compressed with low-rank layouts")
    parser.add_argument("--layers", type=int, nargs="+", help="blocks to compare (default: every compressed MLP)")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens for the statistics")
    parser.add_argument("--test-tokens", type=int, default=4096, help="unseen calibration tokens for the errors")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = json.loads((args.compressed / "config.json").read_text())["quantization_config"]["layers"]
    blocks = args.layers or sorted({int(n.split(".")[2]) for n in layers if ".mlp." in n})
    original, tokenizer = load(args.model)
    fit_windows = calibration_windows(tokenizer, args.tokens, 512)
    test_windows = unseen_calibration_windows(tokenizer, args.test_tokens, 512)
    rows = []
    for block in blocks:
        fit, test = mlp_inputs(original, block, fit_windows), mlp_inputs(original, block, test_windows)
        rows.append(compare_block(original, layers, block, fit, test))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "compressed": args.compressed.name,
        "calibration_tokens": args.tokens,
        "test_tokens": args.test_tokens,
        "blocks": rows,
        "environment": environment(args.threads),
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
