"""How good and how fast is bondcut's TT-SVD on a real model's weights, against truncated SVD and tensorly?

For every self-attention and MLP matrix of the trained default model (SmolLM2-135M: 30 layers x q, k, v, o,
gate, up, down = 210 matrices) this measures, at <= ``--fraction`` (default 50 %) of each matrix's parameters:

* bondcut MPO, default layout (``sites="auto"``, balanced 2 sites for these sizes) at the uniform
  ``chi = chi_for_fraction(sites, fraction)``: relative Frobenius error ||W - W_hat|| / ||W|| from the dense
  reconstruction, checked against ``mpo.truncation_error / ||W||``; parameters; seconds.
* truncated SVD of rank r with r (m + n) <= the MPO's parameters (same or fewer): error, seconds.
* tensorly's ``tensor_train_matrix`` on W reshaped to (m_1..m_k, n_1..n_k) with the MPO's bond dims as TT
  ranks: error, seconds, and a check that its cores are (r, m_i, n_i, r') like ours (same dense matrix).
* a balanced 3-site MPO at the same fraction (extra), compared with the SVD of the same parameter count
  (Eckart-Young error from the singular values already computed).
* the wall-clock time of decomposing all matrices with the default MPO, as a separate loop (target < 60 s on
  2 CPU cores), with the library's default ``compute_dtype`` (float64 SVDs) and again with float32, the
  precision the SVD and tensorly baselines run in (their per-matrix times compare with ``seconds_float32``).

Run (about 4 minutes on 2 cores; the model is cached after the first ``bondcut`` use; times only mean something
on an otherwise idle machine, so the JSON records the CPU share other processes took)::

    python bench/decompose.py                 # -> bench/results/decompose.json and decompose.png
    python bench/decompose.py --limit 14      # quick check on the first two blocks

Expect (measured on 2 AMD EPYC cores): ours/tensorly = 1.000 on every matrix (same algorithm, same ranks, same
cores convention); MPO/SVD median ~1.12 (0.90-3.9; worst on q/k of layer 0, ~1.0 on v): the balanced 2-site MPO
is a sum of Kronecker products, which fits these trained weights worse than plain low rank of the same size; the
3-site MPO is ~10 % worse again. All 210 matrices decompose in ~17 s (float64) or ~10 s (float32).
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path

import torch
from _common import (
    MODULE_TYPES,
    CpuContention,
    base_parser,
    environment,
    module_type,
    summarize,
    write_json,
)

from bondcut.config import CompressConfig
from bondcut.models import load_model
from bondcut.mpo import SiteLayoutError, chi_for_fraction, cores_to_dense, decompose, resolve_sites
from bondcut.report import pyplot, save_figure
from bondcut.surgery import dense_weight, select_targets


def rel_error(w64: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F in float64."""
    return float(torch.linalg.norm(w64 - approx.double()) / torch.linalg.norm(w64))


def measure_mpo(w: torch.Tensor, w64: torch.Tensor, sites, fraction: float) -> dict:
    """bondcut TT-SVD at the uniform chi for ``fraction``; error from the dense reconstruction and from theory."""
    layout = resolve_sites(*w.shape, sites)
    chi = chi_for_fraction(layout, fraction)
    start = time.perf_counter()
    mpo = decompose(w, sites=layout, chi=chi)  # library default compute_dtype (float64 SVDs)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    decompose(w, sites=layout, chi=chi, compute_dtype=torch.float32)  # same precision as SVD and tensorly here
    seconds_float32 = time.perf_counter() - start
    return {
        "sites": [list(s) for s in layout],
        "chi": chi,
        "bond_dims": list(mpo.bond_dims),
        "params": mpo.num_params,
        "rel_error": rel_error(w64, mpo.to_dense()),
        "rel_error_from_discarded": mpo.truncation_error / float(torch.linalg.norm(w64)),
        "seconds": seconds,
        "seconds_float32": seconds_float32,
        "_cores": mpo.cores,
    }


def measure_svd(w: torch.Tensor, w64: torch.Tensor, max_params: int) -> dict:
    """Truncated SVD with the largest rank r such that r (m + n) <= max_params."""
    m, n = w.shape
    rank = max(1, max_params // (m + n))
    start = time.perf_counter()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (m, q), (q,), (q, n) with q = min(m, n)
    left, right = u[:, :rank] * s[:rank], vh[:rank]  # (m, r), (r, n)
    seconds = time.perf_counter() - start
    return {
        "rank": rank,
        "params": rank * (m + n),
        "rel_error": rel_error(w64, left @ right),
        "seconds": seconds,
        "_spectrum": s.double(),
    }


def eckart_young_error(spectrum: torch.Tensor, m: int, n: int, max_params: int) -> tuple[int, float]:
    """Rank and relative error of the best rank-r approximation with r (m + n) <= max_params."""
    rank = max(1, max_params // (m + n))
    return rank, float(torch.sqrt((spectrum[rank:] ** 2).sum() / (spectrum**2).sum()))


def measure_tensorly(w: torch.Tensor, w64: torch.Tensor, sites: list, bond_dims: list, ours: list) -> dict:
    """tensorly's tensor_train_matrix with the same ranks; checks its core convention against ours."""
    import tensorly as tl
    from tensorly.decomposition import tensor_train_matrix

    m_dims, n_dims = [a for a, _ in sites], [b for _, b in sites]
    tensor = w.reshape(*m_dims, *n_dims)  # (m_1..m_k, n_1..n_k): rows first, as tensorly documents
    if tl.get_backend() == "numpy":
        tensor = tensor.numpy()
    start = time.perf_counter()
    tt = tensor_train_matrix(tensor, rank=[1, *bond_dims, 1])
    seconds = time.perf_counter() - start
    factors = [torch.as_tensor(f) for f in tt.factors]  # (r_{i-1}, m_i, n_i, r_i) if the conventions agree
    dense = torch.as_tensor(tl.tt_matrix_to_tensor(tt)).reshape(w.shape)  # tensorly's own reconstruction
    same_shapes = [tuple(f.shape) for f in factors] == [tuple(c.shape) for c in ours]
    same_matrix = bool(torch.allclose(cores_to_dense(factors), dense, atol=1e-5, rtol=1e-4))
    return {
        "ranks": [1, *bond_dims, 1],
        "params": sum(f.numel() for f in factors),
        "core_shapes": [list(f.shape) for f in factors],
        "convention_matches_ours": same_shapes and same_matrix,
        "max_abs_diff_vs_ours": float((dense.double() - cores_to_dense(ours).double()).abs().max()),
        "rel_error": rel_error(w64, dense),
        "seconds": seconds,
    }


def measure_matrix(name: str, w: torch.Tensor, fraction: float) -> dict:
    """All measurements of one weight matrix (float32, m x n)."""
    m, n = w.shape
    w64 = w.double()
    mpo = measure_mpo(w, w64, "auto", fraction)
    svd = measure_svd(w, w64, mpo["params"])
    tly = measure_tensorly(w, w64, mpo["sites"], mpo["bond_dims"], mpo.pop("_cores"))
    try:
        mpo3 = measure_mpo(w, w64, 3, fraction)
        mpo3.pop("_cores")
        mpo3["svd_rank_same_params"], mpo3["svd_rel_error_same_params"] = eckart_young_error(
            svd["_spectrum"], m, n, mpo3["params"]
        )
    except SiteLayoutError as err:
        mpo3 = {"skipped": str(err)}
    svd.pop("_spectrum")
    layer = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else None
    return {
        "name": name,
        "type": module_type(name),
        "layer": layer,
        "shape": [m, n],
        "dense_params": m * n,
        "mpo": mpo,
        "svd": svd,
        "tensorly": tly,
        "mpo3": mpo3,
    }


def ratios(rows: list[dict]) -> dict[str, list[float]]:
    """Per-matrix error ratios that the summary reports."""
    out: dict[str, list[float]] = {
        "mpo_over_svd": [],
        "ours_over_tensorly": [],
        "mpo3_over_svd": [],
        "mpo3_over_mpo": [],
    }
    for r in rows:
        out["mpo_over_svd"].append(r["mpo"]["rel_error"] / r["svd"]["rel_error"])
        out["ours_over_tensorly"].append(r["mpo"]["rel_error"] / r["tensorly"]["rel_error"])
        if "rel_error" in r["mpo3"]:
            out["mpo3_over_svd"].append(r["mpo3"]["rel_error"] / r["mpo3"]["svd_rel_error_same_params"])
            out["mpo3_over_mpo"].append(r["mpo3"]["rel_error"] / r["mpo"]["rel_error"])
    return out


def summarize_rows(rows: list[dict], fraction: float) -> dict:
    """Ratios and errors, overall and per module type; checks; summed per-method times."""

    def block(subset: list[dict]) -> dict:
        errs = {
            key: summarize([r[key]["rel_error"] for r in subset if "rel_error" in r[key]])
            for key in ("mpo", "svd", "tensorly", "mpo3")
        }
        return {**{k: summarize(v) for k, v in ratios(subset).items()}, "rel_error": errs}

    types = [t for t in MODULE_TYPES.values() if any(r["type"] == t for r in rows)]
    gap = [abs(r["mpo"]["rel_error"] - r["mpo"]["rel_error_from_discarded"]) for r in rows]
    return {
        "overall": block(rows),
        "per_type": {t: block([r for r in rows if r["type"] == t]) for t in types},
        "checks": {
            "max_abs_gap_dense_vs_discarded_rel_error": max(gap),
            "tensorly_convention_matches_ours": all(r["tensorly"]["convention_matches_ours"] for r in rows),
            "max_abs_diff_dense_ours_vs_tensorly": max(r["tensorly"]["max_abs_diff_vs_ours"] for r in rows),
            "svd_params_le_mpo_params": all(r["svd"]["params"] <= r["mpo"]["params"] for r in rows),
            "mpo_params_le_fraction": all(r["mpo"]["params"] <= fraction * r["dense_params"] for r in rows),
        },
        "summed_seconds": {
            **{k: sum(r[k].get("seconds", 0.0) for r in rows) for k in ("mpo", "svd", "tensorly", "mpo3")},
            "mpo_float32": sum(r["mpo"]["seconds_float32"] for r in rows),
        },
    }


def time_all(weights: dict[str, torch.Tensor], fraction: float, **options) -> dict:
    """Wall-clock seconds to pick the layout and chi and TT-SVD every matrix with the default MPO."""
    with CpuContention() as busy:
        for w in weights.values():
            layout = resolve_sites(*w.shape, "auto")
            decompose(w, sites=layout, chi=chi_for_fraction(layout, fraction), **options)
    return {
        "matrices": len(weights),
        "seconds": busy.result["wall_s"],
        "target_seconds": 60.0,
        "cpu_contention": busy.result,
    }


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    """Per module type: relative error by depth for MPO, SVD, tensorly, 3-site MPO; last panel: MPO/SVD."""
    plt = pyplot()

    types = list(summary["per_type"])
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    styles = {
        "mpo": ("MPO auto (2-site)", "C0", "-", "o"),
        "svd": ("truncated SVD, <= params", "C1", "-", "s"),
        "tensorly": ("tensorly TT-matrix", "k", "none", "x"),
        "mpo3": ("MPO 3-site", "C2", "--", "^"),
    }
    for ax, t in zip(axes.flat, types):
        subset = sorted((r for r in rows if r["type"] == t), key=lambda r: r["layer"])
        layers = [r["layer"] for r in subset]
        for key, (label, color, ls, marker) in styles.items():
            ys = [r[key].get("rel_error", math.nan) for r in subset]
            ax.plot(layers, ys, color=color, linestyle=ls, marker=marker, markersize=3, label=label)
        ax.set_title(f"{t}_proj {subset[0]['shape'][0]}x{subset[0]['shape'][1]}")
        ax.set_xlabel("layer")
        ax.set_ylabel("||W - W_hat|| / ||W||")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    last = axes.flat[-1]
    by_type = [ratios([r for r in rows if r["type"] == t])["mpo_over_svd"] for t in types]
    last.boxplot(by_type, tick_labels=types)
    last.axhline(1.0, color="gray", linewidth=0.8)
    last.set_title("error ratio MPO / SVD per type")
    fig.suptitle("SmolLM2-135M weights at <= 50 % parameters: relative Frobenius error by depth")
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0], "decompose.json")
    parser.add_argument("--fraction", type=float, default=0.5, help="kept parameter fraction per matrix")
    parser.add_argument("--tensorly-backend", choices=["pytorch", "numpy"], default="pytorch")
    parser.add_argument("--limit", type=int, default=None, help="only the first N matrices (quick check)")
    args = parser.parse_args()

    import tensorly

    torch.set_num_threads(args.threads)
    env = environment(args.threads)  # load average at the start
    tensorly.set_backend(args.tensorly_backend)
    model, _ = load_model(args.model)
    targets = select_targets(model, CompressConfig(chi=1))[: args.limit]
    weights = {t.name: dense_weight(model.get_submodule(t.name)).detach().float().clone() for t in targets}
    del model
    decompose(next(iter(weights.values())), chi=8)  # warm-up: first LAPACK call, lazy inits

    rows = []
    with CpuContention() as busy_rows:
        for i, (name, w) in enumerate(weights.items()):
            rows.append(measure_matrix(name, w, args.fraction))
            r = rows[-1]
            print(
                f"[{i + 1:3d}/{len(weights)}] {name:34s} mpo {r['mpo']['rel_error']:.4f}  svd {r['svd']['rel_error']:.4f}"
                f"  tensorly {r['tensorly']['rel_error']:.4f}  mpo3 {r['mpo3'].get('rel_error', math.nan):.4f}"
            )
    summary = summarize_rows(rows, args.fraction)
    summary["total_decompose_seconds"] = time_all(weights, args.fraction)  # library defaults
    summary["total_decompose_seconds_float32"] = time_all(weights, args.fraction, compute_dtype=torch.float32)
    summary["cpu_contention_per_matrix_loop"] = busy_rows.result

    result = {
        "benchmark": "decompose",
        "model": args.model,
        "fraction": args.fraction,
        "tensorly_backend": args.tensorly_backend,
        "tensorly_version": tensorly.__version__,
        "mpo_default_compute_dtype": str(inspect.signature(decompose).parameters["compute_dtype"].default),
        "environment": env,
        "summary": summary,
        "matrices": rows,
    }
    write_json(args.out, result)
    plot(rows, summary, args.out.with_suffix(".png"))
    o = summary["overall"]
    print(
        f"\nmedian error ratio MPO/SVD {o['mpo_over_svd']['median']:.3f} "
        f"(min {o['mpo_over_svd']['min']:.3f}, max {o['mpo_over_svd']['max']:.3f}); "
        f"ours/tensorly {o['ours_over_tensorly']['median']:.4f}; 3-site/SVD {o['mpo3_over_svd'].get('median', math.nan):.3f}"
    )
    t64, t32 = summary["total_decompose_seconds"], summary["total_decompose_seconds_float32"]
    print(
        f"all {len(weights)} matrices decomposed in {t64['seconds']:.2f} s with the default compute dtype, "
        f"{t32['seconds']:.2f} s in float32 (target < 60 s; other processes' CPU share "
        f"{t64['cpu_contention']['other_share']:.2f}); checks: {summary['checks']}"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
