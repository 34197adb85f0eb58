"""Does keeping a few salient weights exact (dense + sparse + MPO) beat spending those parameters on chi? One run.

For every SA/MLP matrix at a total budget of 50 % of its entries: activation-aware low rank alone, against a
sparse side matrix S of the k most salient weights (|W_ij| * sqrt(C_jj), Wanda/ASVD-style saliency; each kept
weight costs 2 parameters: value and index) plus activation-aware low rank of W - S with the rest of the budget.
Score: relative output error ||(W - W_hat) X|| / ||W X|| on 16,384 calibration tokens. Run:
``python bench/outliers.py`` (~3 min on 2 cores). Writes bench/results/issue5/outliers.json.
"""

from __future__ import annotations

import statistics

import torch
from _common import base_parser, environment, module_type, write_json

import bondcut
from bondcut.calibration import input_covariances
from bondcut.mpo import chi_for_fraction, lowrank_sites, two_site_spectrum
from bondcut.mpo.whiten import output_error
from bondcut.surgery import dense_weight, select_targets

SPARSE_SHARES = (0.005, 0.01, 0.02)  # fraction of the matrix's entries kept exact


def salient_sparse(weight: torch.Tensor, cov: torch.Tensor, count: int) -> torch.Tensor:
    """W restricted to its ``count`` most salient entries (|W_ij| * input scale of column j), zero elsewhere."""
    saliency = weight.abs() * torch.sqrt(torch.diagonal(cov)).to(weight.dtype)[None, :]
    keep = torch.topk(saliency.reshape(-1), count).indices
    sparse = torch.zeros_like(weight).reshape(-1)
    sparse[keep] = weight.reshape(-1)[keep]
    return sparse.reshape(weight.shape)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], "issue5/outliers.json")
    parser.add_argument("--fraction", type=float, default=0.5, help="kept fraction of each matrix's entries")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = bondcut.load(args.model)
    names = [t.name for t in select_targets(model, bondcut.CompressConfig(chi=1))]
    covariances, tokens = input_covariances(model, tokenizer, names, tokens=16384)
    rows = []
    for name in names:
        weight = dense_weight(model.get_submodule(name)).detach().double()
        cov = covariances.pop(name)
        norm = output_error(weight, torch.zeros_like(weight), cov)
        m, n = weight.shape
        budget = args.fraction * m * n
        base = two_site_spectrum(weight, "lowrank", cov)
        row = {"name": name, "type": module_type(name), "lowrank": output_error(weight, base.dense(
            chi_for_fraction(lowrank_sites(m, n), args.fraction)), cov) / norm}  # fmt: skip
        for share in SPARSE_SHARES:
            count = int(share * m * n)
            sparse = salient_sparse(weight, cov, count)
            chi = max(1, int((budget - 2 * count) // (m + n)))
            rest = two_site_spectrum(weight - sparse, "lowrank", cov)
            row[f"sparse_{share}"] = output_error(weight, sparse + rest.dense(chi), cov) / norm
        rows.append(row)
    keys = ["lowrank", *[f"sparse_{s}" for s in SPARSE_SHARES]]
    summary = {k: statistics.median(r[k] for r in rows) for k in keys}
    ratio = {k: statistics.median(r[k] / r["lowrank"] for r in rows) for k in keys[1:]}
    wins = {k: sum(r[k] < r["lowrank"] for r in rows) for k in keys[1:]}
    results = {"benchmark": "outliers", "environment": environment(args.threads), "tokens": tokens,
               "fraction": args.fraction, "median_rel_output_error": summary, "median_ratio_to_lowrank": ratio,
               "matrices_improved": wins, "matrices": len(rows), "rows": rows}  # fmt: skip
    print({k: v for k, v in results.items() if k not in ("rows", "environment")})
    write_json(args.out, results)


if __name__ == "__main__":
    main()
