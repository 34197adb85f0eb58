"""Experiment: the joint search pricing rounding damage at a fraction of truncation damage, as healing treats them.

Measured on SmolLM2-135M with 131,072 healing tokens (`bench/results/issue7/joint_vs_int4_g128_size.json`): healing
keeps about 0.27 of the log-perplexity damage int4 rounding does and about 0.89 of what low rank does, so rounding
weighs about 0.3 of truncation *after* healing. This script scales every packing error (dense matrices, cores and
the embedding's KL) by ``WEIGHT`` before the knapsack, then writes a deferred model to heal like the joint plan:

    python bench/joint_heal_aware.py 75858056 0.3 JH
    bondcut heal JH --out JH_AWARE --tokens 131072 --lr 2e-4 --rest-lr 3e-4 --train mpo+scales --quant-pending \\
        --eval-tokens 8192
"""

from __future__ import annotations

import dataclasses
import sys

import bondcut.joint as joint
from bondcut.candidates import MatrixCandidates, Option
from bondcut.cli import main

_priced, _embedding_kls = joint.priced_options, joint.embedding_kls


def weighted_options(weight: float):
    """priced_options with every packing error scaled by ``weight`` (truncation errors as they are)."""

    def priced(entry: MatrixCandidates, float_bytes: int, group_size: int) -> list[Option]:
        scaled = dataclasses.replace(
            entry,
            packing_errors={k: weight * v for k, v in entry.packing_errors.items()},
            dense_packing_errors={k: weight * v for k, v in entry.dense_packing_errors.items()},
        )
        return _priced(scaled, float_bytes, group_size)

    return priced


def weighted_embedding_kls(weight: float):
    def kls(*args, **kwargs) -> dict[int, float]:
        return {bits: weight * kl for bits, kl in _embedding_kls(*args, **kwargs).items()}

    return kls


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: python bench/joint_heal_aware.py TARGET_BYTES WEIGHT OUT_DIR [more bondcut compress options]")
    weight = float(sys.argv[2])
    joint.priced_options = weighted_options(weight)
    joint.embedding_kls = weighted_embedding_kls(weight)
    sys.argv = ["bondcut", "compress", "smollm2-135m", "--target-bytes", sys.argv[1], "--defer-packing",
                "--rounding", "gptq", "--out", sys.argv[3], *sys.argv[4:]]  # fmt: skip
    main()
