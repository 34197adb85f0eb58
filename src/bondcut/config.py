"""CompressConfig: what to compress and how hard, validated when it is made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

OBJECTIVES = ("kl", "nll")  # what a search may minimize on its calibration text: KL to the original, NLL of the text


def check_objective(objective: str, name: str = "search_objective") -> str:
    """``objective`` if it is one of :data:`OBJECTIVES`, else a ValueError naming them and the setting ``name``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"{name} must be one of {OBJECTIVES}, got {objective!r}")
    return objective


DEFAULT_CALIBRATION_TOKENS = 16384  # input statistics for activation-aware allocation

SitesSpec = int | str | Sequence[Sequence[int]] | None


@dataclass
class CompressConfig:
    """How :func:`bondcut.compress` replaces weight matrices by MPOs.

    Give exactly one size control: ``chi`` (max bond dimension, one int or ``{pattern: chi}``), ``ratio``
    (fraction of the parameters to *keep*), or ``tol`` (relative Frobenius error per matrix; may be combined
    with ``chi`` as a cap). With ``ratio`` the default ``allocation="profile"`` chooses every matrix's layout
    and chi (or keeps it dense) to meet the budget with the least predicted loss, from a per-matrix sensitivity
    profile on calibration text (cached per model); ``allocation="uniform"`` uses one chi for all.

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
            None (default): 16384 with profile allocation, else 0.
        damping: relative damping of the input statistics before whitening (ill-conditioned inputs).
        allocation: with ``ratio``: "profile" (per-matrix choice, the default) or "uniform" (one chi).
        ratio_of: what ``ratio`` is a fraction of: "targets" (the SA+MLP matrices) or "model" (all parameters;
            the untouched ones count in full).
        layouts: candidate 2-site layouts for profile allocation with ``sites="auto"``: "lowrank" ((m x 1)(1 x n))
            and/or "balanced" (a Kronecker-product sum). ``sites="lowrank"`` or ``2`` restrict it to one.
        profile: JSON path of the sensitivity profile to reuse or write (default: bondcut's cache, per model).
        profile_tokens: calibration tokens per profile loss evaluation.
        profile_fractions: kept fractions at which every matrix's loss increase is measured.
        search_evaluations: budget of real evaluations to refine the profile plan, or the joint plan of
            ``target_bytes`` (0 = none).
        search_tokens: calibration tokens per search evaluation.
        search_objective: what the search minimizes on them: "kl" (KL divergence to the original, the default) or
            "nll" (the text's negative log-likelihood: log perplexity); the joint search's starts are chosen by it too.
        target_bytes: instead of ``ratio``: bytes the weights may take on disk (an int, '60MB', or a share of the
            model's fp32 weights such as '10%', 4 bytes per parameter); the joint allocator
            (:mod:`bondcut.joint`) then chooses per matrix layout, chi and packed precision (float, int8, int4),
            the embedding's precision and up to ``max_deleted_blocks`` whole blocks to delete.
        max_deleted_blocks: how many blocks the joint allocator may delete (0 = none).
        joint_bits: packed precisions the joint allocator may use; ``group_size``: weights per scale.
        embedding_tiers: with ``target_bytes``: row tiers the joint allocator may also give an embedding tied to
            the LM head, beside ``joint_bits`` (e.g. ``("8:0.1,4:0.4,3:0.5",)``: the tenth of rows used most at 8
            bits, the rarest half at 3; :mod:`bondcut.quant.tiers`). None: :data:`bondcut.quant.tiers.DEFAULT_TIERS`
            (those whose widths fill whole bytes in the group sizes tried); ``()``: none.
        group_sizes: with ``target_bytes``: the group sizes the joint allocator tries, one per plan (each packed
            tensor of a plan shares it); the one with the least predicted KL wins. Empty: ``(group_size,)``.
        joint_rounding: how its packed dense matrices and embedding are rounded: "gptq" (activation-aware, on
            calibration text; the plan prices each dense matrix's packing error with the same rounding) or "rtn".
        joint_rotate: with ``target_bytes``: packed dense matrices store W R^T and rotate their inputs by R, a random
            block Hadamard (:mod:`bondcut.quant.rotation`; less rounding error, priced that way too).
        rounding_weight: with ``target_bytes``: how much rounding damage counts against truncation's in the
            plan. 1 (default) minimizes the predicted KL of the model as packed; a model that will be healed keeps
            less of its rounding damage than of its truncation damage (:data:`bondcut.joint.HEALED_ROUNDING_WEIGHT`,
            measured on SmolLM2-135M), so plan for it with that weight.
        refit_tokens: after the surgery, refit the MPO layers block by block to the original's outputs on the
            inputs the compressed model gives them, on this many calibration tokens (:mod:`bondcut.refit`; 0 = off).
            Same layouts and sizes; costs a second copy of the model while it runs. Not with ``target_bytes``.
        mlp_neurons: build each compressed gated MLP from its most used hidden neurons instead of low-rank
            factors, its down projection refit by least squares (:mod:`bondcut.neurons`). With profile allocation
            the plan prices every MLP as one item whose options are neuron counts (:mod:`bondcut.neuron_pricing`),
            so the knapsack and the search split the budget between attention and MLPs for that structure;
            with a fixed chi, tol or uniform allocation, an MLP with any compressed matrix keeps as many whole
            neurons as its three matrices' parameters buy. Needs activation-aware compression
            (``calibration_tokens`` > 0); not with ``target_bytes`` or ``refit_tokens``.
        defer_packing: with ``target_bytes``: do the MPO surgery and block deletion but leave the packing pending
            in the model's config, so the float model can be healed first;
            :func:`bondcut.joint.apply_pending_packing` (``bondcut quantize --pending``) packs it afterwards.
    """

    chi: int | dict[str, int] | None = None
    ratio: float | None = None
    tol: float | None = None
    sites: SitesSpec = "auto"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    modules: list[str] | None = None
    calibration_tokens: int | None = None
    damping: float = 1e-2
    allocation: str = "profile"
    ratio_of: str = "targets"
    layouts: tuple[str, ...] = ("lowrank", "balanced")
    profile: str | None = None
    profile_tokens: int = 512
    profile_fractions: tuple[float, ...] = (0.1, 0.3)
    search_evaluations: int = 0
    search_tokens: int = 1024
    search_objective: str = "kl"
    target_bytes: int | str | None = None
    max_deleted_blocks: int = 4
    joint_bits: tuple[int, ...] = (8, 4)
    embedding_tiers: tuple[str, ...] | None = None
    joint_rounding: str = "gptq"
    joint_rotate: bool = False
    rounding_weight: float = 1.0
    defer_packing: bool = False
    group_size: int = 64
    group_sizes: tuple[int, ...] = ()
    refit_tokens: int = 0
    mlp_neurons: bool = False

    def __post_init__(self) -> None:
        example = "e.g. CompressConfig(ratio=0.5), CompressConfig(chi=64) or CompressConfig(target_bytes=60_000_000)"
        controls = [self.ratio is not None, self.chi is not None or self.tol is not None, self.target_bytes is not None]
        if sum(controls) > 1:
            raise ValueError(f"give one size control: ratio, target_bytes, or chi and/or tol; {example}")
        if not any(controls):
            raise ValueError(f"no size given: set chi, ratio, tol or target_bytes; {example}")
        if isinstance(self.target_bytes, str):
            from .joint import parse_budget

            self.target_bytes = parse_budget(self.target_bytes)
        elif self.target_bytes is not None and self.target_bytes <= 0:
            raise ValueError(f"target_bytes must be positive, got {self.target_bytes}; {example}")
        from .quant.packing import BITS, group_multiple

        if self.max_deleted_blocks < 0 or not self.joint_bits or any(b not in BITS for b in self.joint_bits):
            raise ValueError(f"max_deleted_blocks must be >= 0 and joint_bits a non-empty subset of {BITS}, got "
                             f"{self.max_deleted_blocks}, {self.joint_bits}; e.g. joint_bits=(8, 4, 3)")  # fmt: skip
        multiple = max(group_multiple(b) for b in self.joint_bits)
        if self.target_bytes is not None and any(g < multiple or g % multiple for g in self.joint_group_sizes):
            raise ValueError(f"group sizes must be multiples of {multiple} (>= {multiple}) for widths "
                             f"{self.joint_bits}, got group_size={self.group_size}, group_sizes={self.group_sizes}; "
                             "e.g. group_sizes=(32, 64, 128)")  # fmt: skip
        from .quant.tiers import DEFAULT_TIERS, RowTiers

        if self.embedding_tiers is None:
            fits = tuple(t for t in DEFAULT_TIERS if RowTiers.parse(t).fills_whole_bytes(self.joint_group_sizes))
            self.embedding_tiers = fits if self.target_bytes is not None else ()
        self.embedding_tiers = tuple(self.embedding_tiers)
        if self.embedding_tiers:
            if self.target_bytes is None:
                raise ValueError("embedding_tiers applies to the joint search: give target_bytes as well (to pack "
                                 "one model's embedding in tiers: QuantizeConfig(embedding_tiers=...))")  # fmt: skip
            for tiers in self.embedding_tiers:
                if not RowTiers.parse(tiers).fills_whole_bytes(self.joint_group_sizes):
                    raise ValueError(f"row tiers {tiers} need group sizes that fill whole bytes at each width, got "
                                     f"{self.joint_group_sizes}")  # fmt: skip
        if self.group_sizes and self.target_bytes is None:
            raise ValueError("group_sizes applies to the joint search: give target_bytes as well")
        if not 0 < self.rounding_weight <= 1:
            raise ValueError(f"rounding_weight is the share of rounding damage the plan counts and must be in (0, 1], "
                             f"got {self.rounding_weight}; e.g. 0.3 for a model to be healed")  # fmt: skip
        if self.rounding_weight != 1 and self.target_bytes is None:
            raise ValueError("rounding_weight applies to the joint search: give target_bytes as well")
        if self.defer_packing and self.target_bytes is None:
            raise ValueError("defer_packing applies to the joint search: give target_bytes as well")
        if self.joint_rotate and self.target_bytes is None:
            raise ValueError("joint_rotate applies to the joint search's packing: give target_bytes as well (to "
                             "rotate a model's packed layers otherwise: QuantizeConfig(rotate=True))")  # fmt: skip
        if self.refit_tokens < 0 or (self.refit_tokens and self.target_bytes is not None):
            raise ValueError(f"refit_tokens must be >= 0 and applies to ratio/chi/tol compression, not the joint search "
                             f"(it packs and deletes blocks), got {self.refit_tokens}")  # fmt: skip
        if self.joint_rounding not in ("gptq", "rtn"):
            raise ValueError(f"joint_rounding must be 'gptq' or 'rtn', got {self.joint_rounding!r}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio is the kept fraction of parameters and must be in (0, 1], got {self.ratio}")
        if self.tol is not None and not 0 <= self.tol < 1:
            raise ValueError(f"tol is a relative error and must be in [0, 1), got {self.tol}")
        chis = self.chi.values() if isinstance(self.chi, dict) else [self.chi]
        if any(c is not None and (not isinstance(c, int) or c < 1) for c in chis):
            raise ValueError(f"chi must be a positive int (or a dict of them), got {self.chi!r}")
        if isinstance(self.sites, str) and self.sites not in ("auto", "lowrank"):
            raise ValueError(f"sites must be 'auto', 'lowrank', an int >= 1 or a list of pairs, got {self.sites!r}")
        if self.calibration_tokens is None:
            self.calibration_tokens = DEFAULT_CALIBRATION_TOKENS if self.allocates else 0
        if self.mlp_neurons and (self.target_bytes is not None or self.refit_tokens or self.calibration_tokens == 0):
            raise ValueError("mlp_neurons needs activation-aware compression sized by ratio, chi or tol (it selects "
                             "neurons on the calibration statistics), without target_bytes or refit_tokens; got "
                             f"target_bytes={self.target_bytes}, refit_tokens={self.refit_tokens}, calibration_tokens="
                             f"{self.calibration_tokens}; e.g. CompressConfig(ratio=0.7, mlp_neurons=True)")  # fmt: skip
        if self.allocation not in ("profile", "uniform"):
            raise ValueError(f"allocation must be 'profile' or 'uniform', got {self.allocation!r}")
        if self.ratio_of not in ("targets", "model"):
            raise ValueError(f"ratio_of must be 'targets' or 'model', got {self.ratio_of!r}")
        if self.allocates and self.sites not in ("auto", "lowrank", 2):
            raise ValueError(f"profile allocation chooses among 2-site layouts: sites must be 'auto', 'lowrank' or 2, "
                             f"got {self.sites!r}; or use allocation='uniform'")  # fmt: skip
        if self.search_evaluations < 0 or self.profile_tokens < 1 or self.search_tokens < 1:
            raise ValueError("search_evaluations must be >= 0 and profile_tokens, search_tokens >= 1")
        check_objective(self.search_objective)
        if self.calibration_tokens < 0 or self.damping < 0:
            raise ValueError(
                f"calibration_tokens and damping must be >= 0, got {self.calibration_tokens}, {self.damping}"
            )
        if isinstance(self.sites, int) and self.sites < 1:
            raise ValueError(f"sites must be >= 1, got {self.sites}")

    @property
    def allocates(self) -> bool:
        """True when ``ratio`` is met by the profile-based allocator (not one uniform chi)."""
        return (self.ratio is not None and self.allocation == "profile") or self.target_bytes is not None

    @property
    def joint_group_sizes(self) -> tuple[int, ...]:
        """The group sizes the joint allocator tries (``group_sizes``, or ``group_size`` alone)."""
        return tuple(self.group_sizes) or (self.group_size,)

    @property
    def candidate_layouts(self) -> tuple[str, ...]:
        """The layouts the allocator may choose from, given ``sites``."""
        return {"lowrank": ("lowrank",), 2: ("balanced",)}.get(self.sites, tuple(self.layouts))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
