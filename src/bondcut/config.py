"""CompressConfig: what to compress and how hard, validated when it is made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SitesSpec = int | str | Sequence[Sequence[int]] | None


@dataclass
class CompressConfig:
    """How :func:`bondcut.compress` replaces weight matrices by MPOs.

    Give exactly one size control: ``chi`` (max bond dimension, one int or ``{pattern: chi}``), ``ratio``
    (fraction of the targeted layers' parameters to *keep*; one uniform chi is chosen to meet it), or ``tol``
    (relative Frobenius error per matrix; may be combined with ``chi`` as a cap).

    Attributes:
        chi: max bond dimension; a dict maps module-name patterns to chi (every target must match one).
        ratio: kept fraction of the targeted parameters, in (0, 1]; 0.5 halves them, 0.7 removes 30 %.
        tol: relative Frobenius error target per matrix, in [0, 1).
        sites: "auto" (2-5 balanced sites by size), an int (balanced k sites), "lowrank" ((m x 1)(1 x n)),
            or explicit ``[(m_1, n_1), ...]`` pairs.
        include: patterns (exact, glob, or ``re:`` regex) restricting the architecture's SA/MLP matrices.
        exclude: patterns removed from the selection (e.g. ``["re:down_proj$"]``).
        modules: explicit module names or patterns, for architectures not in bondcut's table.
        calibration_tokens: if > 0, decompose activation-aware: minimize the output error on this many tokens
            of the corpus's calibration split (needs the tokenizer in :func:`bondcut.compress`); 0 = plain TT-SVD.
        damping: relative damping of the input statistics before whitening (ill-conditioned inputs).
    """

    chi: int | dict[str, int] | None = None
    ratio: float | None = None
    tol: float | None = None
    sites: SitesSpec = "auto"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    modules: list[str] | None = None
    calibration_tokens: int = 0
    damping: float = 1e-2

    def __post_init__(self) -> None:
        example = "e.g. CompressConfig(ratio=0.5) or CompressConfig(chi=64)"
        if self.ratio is not None and (self.chi is not None or self.tol is not None):
            raise ValueError(f"give either ratio, or chi and/or tol, not both; {example}")
        if self.ratio is None and self.chi is None and self.tol is None:
            raise ValueError(f"no size given: set chi, ratio or tol; {example}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio is the kept fraction of parameters and must be in (0, 1], got {self.ratio}")
        if self.tol is not None and not 0 <= self.tol < 1:
            raise ValueError(f"tol is a relative error and must be in [0, 1), got {self.tol}")
        chis = self.chi.values() if isinstance(self.chi, dict) else [self.chi]
        if any(c is not None and (not isinstance(c, int) or c < 1) for c in chis):
            raise ValueError(f"chi must be a positive int (or a dict of them), got {self.chi!r}")
        if isinstance(self.sites, str) and self.sites not in ("auto", "lowrank"):
            raise ValueError(f"sites must be 'auto', 'lowrank', an int >= 1 or a list of pairs, got {self.sites!r}")
        if self.calibration_tokens < 0 or self.damping < 0:
            raise ValueError(f"calibration_tokens and damping must be >= 0, got {self.calibration_tokens}, {self.damping}")
        if isinstance(self.sites, int) and self.sites < 1:
            raise ValueError(f"sites must be >= 1, got {self.sites}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
