"""Ablation: the joint search with its MPO options removed (each matrix dense at float, int8 or int4; the embedding's
precision and block deletions as usual), so a plan's low-rank choices can be weighed against plain mixed precision
at the same bytes. Writes a deferred model, to heal like the full joint plan:

    python bench/joint_dense_only.py 75858056 JD [--group-sizes 32,64,128]
    bondcut heal JD --out JD_AWARE --tokens 131072 --lr 2e-4 --rest-lr 3e-4 --train mpo+scales --quant-pending \\
        --eval-tokens 8192

At int4 GPTQ's own file size (75,858,056 bytes) the plan is uniform int4: the int4 baseline, healed through the
joint pipeline (`bench/results/issue7/joint_dense_only_at_int4_size_aware_heal.json`).
"""

from __future__ import annotations

import dataclasses
import sys

import bondcut.joint as joint
from bondcut.candidates import MatrixCandidates, Option
from bondcut.cli import main

_all_options = joint.priced_options


def dense_options(entry: MatrixCandidates, float_bytes: int, group_size: int) -> list[Option]:
    """The joint pricing of ``entry`` with only its dense option left in."""
    dense = dataclasses.replace(entry, options=[o for o in entry.options if o.layout == "dense"])
    return _all_options(dense, float_bytes, group_size)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python bench/joint_dense_only.py TARGET_BYTES OUT_DIR [more bondcut compress options]")
    joint.priced_options = dense_options
    sys.argv = ["bondcut", "compress", "smollm2-135m", "--target-bytes", sys.argv[1], "--defer-packing",
                "--rounding", "gptq", "--out", sys.argv[2], *sys.argv[3:]]  # fmt: skip
    main()
