"""``bondcut compare``: the paper's table for any model, in one run, with the strongest baselines beside ours.

Every method starts from the same original model and, where it trains, gets the same healing budget
(``heal_tokens`` of the train split, same schedule) and the same calibration data:

- ``original``; ``original_tuned``: the original itself trained (all parameters, ``finetune_lr``) on the same
  budget, the reference for healed rows: healing on the train split also adapts a model to the corpus the
  held-out text comes from, so a healed row can beat the untuned original and still have lost quality;
- ``int8`` / ``int4``: weight-only group-wise quantization of it (:mod:`bondcut.quant`), healed
  by training its group scales and offsets (codes fixed) on the same budget;
- ``svd``: truncated SVD at one rank for all SA/MLP matrices; ``svd_llm``: activation-aware low rank
  (SVD-LLM-style whitening) at one rank; ``layerchop``: whole blocks deleted (:mod:`bondcut.layerchop`);
- ``bondcut``: profile allocation + aware decomposition + search; ``bondcut_int4``: that model after healing,
  with embeddings, head and dense layers packed to 4 bits (the paper's "MPO + 4-bit" model);
- ``joint``: one byte budget (``target_bytes``, default: bondcut_int4's file size) shared by MPO layouts and χ,
  int8/int4 packing (``joint_bits``: also 3/2) and block deletion, chosen together (:mod:`bondcut.joint`; planned
  for the healed model, rounding damage weighted ``joint_rounding_weight`` against truncation's).
  ``joint_healing="float"``: its float structure (MPO cores, blocks deleted) is healed, then packed; ``"packed"``:
  packed first, then its group scales and offsets healed like the int rows; ``"aware"`` (the default): its dense
  layers and embedding packed first, then its MPO cores trained through the rounding the plan gives them beside the
  packed layers' scales, then the cores packed (quantization-aware; its "before healing" figure, in every case:
  packed without healing).

Each method's model and result land in ``out/models/NAME`` and ``out/results/NAME.json`` (a rerun skips
what is done: the run resumes; a result made under other settings of that method is rebuilt). Speed is measured
last, every model in its own process, against the original.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cache import atomic_write_text
from .config import CompressConfig, check_objective
from .mpo_linear import MPOLinear

METHODS = ("original", "original_tuned", "int8", "int4", "int4_gptq", "svd", "svd_llm", "layerchop", "bondcut",
           "bondcut_int4", "joint")  # fmt: skip
QUANTIZED = {"int8": (8, "rtn"), "int4": (4, "rtn"), "int4_gptq": (4, "gptq")}  # method -> (bits, rounding)
HEALED = ("original_tuned", "int8", "int4", "int4_gptq", "svd", "svd_llm", "layerchop", "bondcut", "joint")
JOINT_HEALING = ("float", "packed", "aware")
SAME_SHAPE = ("original_tuned",)  # rows with the original's architecture: not timed again


@dataclass
class CompareConfig:
    """One comparison run: size, healing budget, what is measured (see ``bondcut compare --help``)."""

    ratio: float = 0.5
    heal_tokens: int = 65536
    heal_lr: float = 2e-4
    scale_lr: float = 3e-4  # healing packed models: relative gain of each scale, offset shift in units of its range
    finetune_lr: float = 5e-5  # original_tuned: every pretrained parameter trains
    joint_healing: str = "aware"  # measured best of the three at int4's size (README)
    distill: float = 0.0
    eval_tokens: int = 8192
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    methods: tuple[str, ...] = METHODS
    search_evaluations: int = 48
    chop_rule: str = "measured"
    quantize_cores: bool = False
    target_bytes: int | str | None = None  # joint's budget: bytes or '10%' of fp32 weights; None = bondcut_int4's size
    joint_blocks: int = 4
    joint_rounding_weight: float | None = None  # None: planned for healing (HEALED_ROUNDING_WEIGHT) when it heals
    joint_bits: tuple[int, ...] = (8, 4)  # packed widths the joint search may use, e.g. (8, 4, 3)
    joint_objective: str = "kl"  # what the joint search minimizes: KL to the original, or the text's NLL ("nll")
    group_size: int = 64
    rounding: str = "gptq"  # how bondcut_int4 and joint round their packed dense weights (int4 / int4_gptq: both)
    rotate: bool = False  # every packed row's dense layers rotate their inputs first (bondcut.quant.rotation)
    bench_repeats: int = 3
    bench_train_batch: int = 8
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounding not in ("gptq", "rtn"):
            raise ValueError(f"rounding must be 'gptq' or 'rtn', got {self.rounding!r}")
        if self.joint_healing not in JOINT_HEALING:
            raise ValueError(f"joint_healing must be 'float' (heal, then pack), 'packed' (pack, then heal the "
                             f"scales) or 'aware' (cores through their rounding, beside the scales), got "
                             f"{self.joint_healing!r}")  # fmt: skip
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}, e.g. --methods svd,bondcut")
        if "bondcut_int4" in self.methods and "bondcut" not in self.methods:
            raise ValueError("method bondcut_int4 quantizes the bondcut model: add bondcut to --methods")
        if "joint" in self.methods and self.target_bytes is None and "bondcut_int4" not in self.methods:
            raise ValueError(
                "method joint matches bondcut_int4's bytes: add bondcut,bondcut_int4 or give --target-bytes"
            )
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio (kept fraction of SA+MLP parameters) must be in (0, 1), got {self.ratio}")
        if self.heal_tokens < 0 or self.eval_tokens < 2:
            raise ValueError(f"need heal_tokens >= 0 and eval_tokens >= 2, got {self.heal_tokens}, {self.eval_tokens}")
        trains = self.heal_tokens > 0  # without a budget original_tuned would repeat the original
        if self.joint_rounding_weight is None:
            from .joint import HEALED_ROUNDING_WEIGHT

            self.joint_rounding_weight = HEALED_ROUNDING_WEIGHT if trains else 1.0
        if not 0 < self.joint_rounding_weight <= 1:
            raise ValueError(f"joint_rounding_weight must be in (0, 1], got {self.joint_rounding_weight}")
        self.joint_bits = tuple(self.joint_bits)
        check_objective(self.joint_objective, "joint_objective")
        if "joint" in self.methods:  # the joint search's own checks (widths, groups that fill whole bytes), now
            CompressConfig(target_bytes=1, joint_bits=self.joint_bits, group_size=self.group_size)
        self.methods = tuple(m for m in METHODS if m in self.methods and (trains or m != "original_tuned"))


@dataclass
class MethodResult:
    """What one method produced: sizes, quality before/after healing, sample, and how it was made."""

    method: str
    directory: str
    weights: int  # weight entries stored (parameters + packed entries)
    target_weights: int  # entries left in the SA+MLP matrices (what --ratio counts)
    disk_bytes: int
    build_s: float
    heal_s: float = 0.0
    perplexity_before_heal: dict | None = None
    perplexity: dict = field(default_factory=dict)
    zero_shot: dict = field(default_factory=dict)
    generation: str = ""
    notes: str = ""
    settings: dict = field(default_factory=dict)  # what made it (method_settings); other settings: rebuilt

    def to_dict(self) -> dict:
        return asdict(self)


def weight_count(module: nn.Module) -> int:
    """Parameters plus the entries of packed weights (a quantized weight still counts as its shape)."""
    return sum(p.numel() for p in module.parameters()) + sum(getattr(m, "packed_numel", 0) for m in module.modules())


def target_weight_count(model: nn.Module) -> int:
    """Entries held by the model's SA+MLP matrices, whatever their form (dense, MPO, packed)."""
    from .architectures import targets_of

    return sum(weight_count(model.get_submodule(t.name)) for t in targets_of(model))


SETTINGS = {  # method -> the CompareConfig fields its result depends on (beyond SHARED_SETTINGS)
    "original": (),
    "original_tuned": ("finetune_lr", "distill"),
    **{m: ("group_size", "scale_lr", "rotate") for m in QUANTIZED},
    "svd": ("ratio", "heal_lr", "distill"),
    "svd_llm": ("ratio", "heal_lr", "distill"),
    "layerchop": ("ratio", "chop_rule", "heal_lr", "distill"),
    "bondcut": ("ratio", "search_evaluations", "heal_lr", "distill"),
    "bondcut_int4": ("group_size", "rounding", "quantize_cores", "rotate"),
    "joint": ("target_bytes", "joint_blocks", "joint_rounding_weight", "joint_bits", "joint_objective", "group_size",
              "rounding", "rotate", "joint_healing", "heal_lr", "scale_lr", "distill"),
}  # fmt: skip
SHARED_SETTINGS = ("heal_tokens", "eval_tokens", "tasks", "task_limit", "seed")
SPEED_ONLY_SETTINGS = ("methods", "bench_repeats", "bench_train_batch", "threads")  # no method's result depends on them
DEPENDS_ON = {"bondcut_int4": "bondcut", "joint": "bondcut_int4"}  # built from it (joint: its bytes, by default)


def method_settings(method: str, config: CompareConfig) -> dict:
    """The settings ``method``'s result depends on, including those of the method it is built from; a result file
    holding other settings is stale (e.g. int rows made before they healed their scales)."""
    fields = asdict(config)
    settings = {name: fields[name] for name in (*SHARED_SETTINGS, *SETTINGS[method])}
    for name in ("tasks", "joint_bits"):  # as JSON stores them
        if name in settings:
            settings[name] = list(settings[name])
    parent = DEPENDS_ON.get(method)
    if parent and not (method == "joint" and config.target_bytes is not None):
        settings["from"] = method_settings(parent, config)
    return settings


def _compress_config(method: str, config: CompareConfig) -> CompressConfig:
    uniform = {"ratio": config.ratio, "allocation": "uniform"}
    return {
        "svd": lambda: CompressConfig(**uniform, sites="lowrank", calibration_tokens=0),
        "svd_llm": lambda: CompressConfig(**uniform, sites="lowrank", calibration_tokens=16384),
        "bondcut": lambda: CompressConfig(ratio=config.ratio, search_evaluations=config.search_evaluations),
    }[method]()


def build(method: str, model: nn.Module, tokenizer, config: CompareConfig, target_bytes: int | None = None) -> str:
    """Turn ``model`` (a fresh copy of the original) into ``method``'s model, in place; returns a note."""
    from .joint import precision_text
    from .quant import QuantizeConfig, quantize_model
    from .surgery import compress

    if method == "original":
        return ""
    if method == "original_tuned":
        return f"the original, every parameter trained on the healing budget (lr {config.finetune_lr:g})"
    if method == "joint":
        joint = compress(model, CompressConfig(target_bytes=target_bytes, max_deleted_blocks=config.joint_blocks,
                                               group_size=config.group_size, joint_rounding=config.rounding,
                                               rounding_weight=config.joint_rounding_weight, defer_packing=True,
                                               joint_bits=config.joint_bits, joint_rotate=config.rotate,
                                               search_objective=config.joint_objective),
                         tokenizer=tokenizer).joint  # fmt: skip
        return (f"joint plan for {target_bytes / 1e6:.1f} MB: blocks deleted {joint['removed_blocks']}, embedding "
                f"{precision_text(joint['embedding_bits'])}")  # fmt: skip
    if method in QUANTIZED:
        bits, rounding = QUANTIZED[method]
        quantize_model(model, QuantizeConfig(bits=bits, group_size=config.group_size, method=rounding,
                                             rotate=config.rotate), tokenizer=tokenizer)  # fmt: skip
        return (f"weight-only int{bits} ({'GPTQ' if rounding == 'gptq' else 'round to nearest'}"
                f"{', inputs rotated' if config.rotate else ''}), groups of {config.group_size}, embeddings and head "
                "included")  # fmt: skip
    if method == "layerchop":
        from .layerchop import chop

        report = chop(model, tokenizer, 1 - config.ratio, rule=config.chop_rule)
        return f"removed blocks {report.removed} ({config.chop_rule} rule)"

    report = compress(model, _compress_config(method, config), tokenizer=tokenizer)
    if report.uniform_chi is not None:
        return f"uniform rank {report.uniform_chi}"
    return "profile allocation + search" if config.search_evaluations else "profile allocation"


def _quality(model: nn.Module, tokenizer, config: CompareConfig, tasks: bool) -> dict:
    from .evaluate import PROMPTS, generate_greedy
    from .perplexity import heldout_perplexity
    from .quant.dense_cache import dequantize_once
    from .quant.kernels import packed_kernels
    from .zeroshot import zero_shot

    # the stored model's quality: exact dequantization (kernels are for speed), once per weight for all three
    with packed_kernels(False), dequantize_once():
        ppl = heldout_perplexity(model, tokenizer, max_tokens=config.eval_tokens)
        out = {"perplexity": ppl.to_dict()}
        if tasks:
            first = PROMPTS[:1]  # the table shows one sample: generating the others was wasted time
            out["generation"] = generate_greedy(model, tokenizer, first, max_new_tokens=16)[first[0]]
            if config.tasks:
                out["zero_shot"] = zero_shot(model, tokenizer, config.tasks, limit=config.task_limit)
    return out


def _packed_copy(model: nn.Module, tokenizer) -> nn.Module:
    """A copy of a deferred joint model with its pending packing applied: the joint row before healing."""
    import copy

    from .joint import apply_pending_packing

    packed = copy.deepcopy(model)
    apply_pending_packing(packed, tokenizer)
    return packed


def run_method(
    method: str,
    original: str,
    out: Path,
    config: CompareConfig,
    teacher: nn.Module | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> MethodResult:
    """Build, heal (if it trains), evaluate and save one method; reuse its result file when present."""
    from .heal import HealConfig, heal
    from .joint import apply_pending_packing, budget_bytes
    from .quant import QuantizeConfig, quantize_model
    from .serialization import load, save
    from .sizes import directory_weight_bytes

    result_file = out / "results" / f"{method}.json"
    stage = on_stage or (lambda m, s: None)
    settings = method_settings(method, config)
    if result_file.exists():
        done = MethodResult(**json.loads(result_file.read_text()))
        if done.settings == settings:
            return done
        stage(method, "made under other settings: rebuilding")
    directory = out / "models" / method
    source = out / "models" / "bondcut" if method == "bondcut_int4" else original
    model, tokenizer = load(source)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    stage(method, "building")
    if method == "bondcut_int4":
        quantize_model(model, QuantizeConfig(bits=4, group_size=config.group_size, cores=config.quantize_cores,
                                             method=config.rounding, rotate=config.rotate),
                       tokenizer=tokenizer)  # fmt: skip
        rotated = ", inputs rotated" if config.rotate else ""
        note = f"the healed bondcut model; embeddings, head and dense layers int4 ({config.rounding}{rotated})" + (
            ", cores int4" if config.quantize_cores else ""
        )
    else:
        target = None if config.target_bytes is None else budget_bytes(config.target_bytes, model)
        if method == "joint" and target is None:
            target = json.loads((out / "results" / "bondcut_int4.json").read_text())["disk_bytes"]
        note = build(method, model, tokenizer, config, target)
    build_s = time.perf_counter() - start
    before = None
    heal_s = 0.0
    train = _what_trains(method, model, config)
    cores_float = method == "joint" and train in ("mpo", "mpo+scales")  # the plan's cores are packed after healing
    if method == "joint" and not cores_float:  # nothing float to heal (or healing after packing): pack now
        stage(method, "packing")
        apply_pending_packing(model, tokenizer)
    if method in HEALED and config.heal_tokens and train is not None:
        stage(method, "quality before healing")
        unhealed = _packed_copy(model, tokenizer) if cores_float else model
        before = _quality(unhealed, tokenizer, config, tasks=False)["perplexity"]
        del unhealed
        stage(method, "healing")
        start = time.perf_counter()
        lr = config.finetune_lr if method == "original_tuned" else config.heal_lr
        aware = train == "mpo+scales"  # the joint plan's cores through their rounding, beside the packed scales
        rows = heal_rows(config.heal_tokens)
        heal_config = HealConfig(tokens=config.heal_tokens, lr=config.scale_lr if train == "scales" else lr,
                                 batch_size=rows, micro_batch=min(rows, HealConfig.micro_batch),
                                 rest_lr=config.scale_lr if aware else None, quant_pending=aware, train=train,
                                 distill=config.distill, eval_tokens=0, seed=config.seed)  # fmt: skip  # scored here, before and after
        heal(model, tokenizer, heal_config, teacher=teacher if config.distill else None)
        heal_s = time.perf_counter() - start
    if method == "joint" and train == "mpo":
        stage(method, "packing")
        apply_pending_packing(model, tokenizer)
    model.eval()
    stage(method, "quality")
    quality = _quality(model, tokenizer, config, tasks=True)
    save(model, directory, tokenizer=tokenizer, overwrite=True)
    result = MethodResult(
        method=method,
        directory=str(directory.relative_to(out)),
        weights=weight_count(model),
        target_weights=target_weight_count(model),
        disk_bytes=directory_weight_bytes(directory),
        build_s=build_s,
        heal_s=heal_s,
        perplexity_before_heal=before,
        perplexity=quality["perplexity"],
        zero_shot=quality.get("zero_shot", {}),
        generation=quality.get("generation", ""),
        notes=note,
        settings=settings,
    )
    atomic_write_text(result_file, json.dumps(result.to_dict(), indent=2))
    _forget_speed(out, method)
    return result


def heal_rows(tokens: int) -> int:
    """Rows per healing step: healing's usual batch, fewer when the budget is smaller than one such step (a
    budget of 512 tokens trains on 512, not on one full batch of 2,048)."""
    from .heal import HealConfig

    return max(1, min(HealConfig.batch_size, tokens // HealConfig.seq_len))


def _what_trains(method: str, model: nn.Module, config: CompareConfig) -> str | None:
    """What healing trains for ``method`` (None: nothing): int rows their packed scales and offsets; LayerChop's
    blocks are dense (continued pretraining: all); the joint model its MPO cores before packing ("float"), its
    cores through their planned rounding beside its packed layers' scales ("aware": "mpo+scales"), or, with
    ``joint_healing="packed"`` or a plan without MPO layers, its scales after packing; the rest their cores."""
    if method in QUANTIZED:
        return "scales"
    if method in ("layerchop", "original_tuned"):
        return "all"
    if method == "joint":
        from .hf_integration import pending_packing

        has_cores = any(isinstance(m, MPOLinear) for m in model.modules())
        if has_cores and config.joint_healing != "packed":
            return "mpo" if config.joint_healing == "float" else "mpo+scales"
        packing = pending_packing(model) or {}
        return "scales" if packing.get("layers") or packing.get("embedding_bits") else None
    return "mpo" if method in HEALED else None


def _forget_speed(out: Path, method: str) -> None:
    """Drop ``method``'s timing from speed.json: it described the model this run has just rebuilt."""
    speed_file = out / "results" / "speed.json"
    if speed_file.exists():
        done = json.loads(speed_file.read_text())
        if done["per_method"].pop(method, None) is not None:
            atomic_write_text(speed_file, json.dumps(done, indent=2))


SPEED_KEYS = ("decode_tokens_per_s", "decode_speedup", "train_step_s", "train_step_speedup", "peak_rss_mb")


def measure_speed(out: Path, results: Sequence[MethodResult], config: CompareConfig, on_step=None) -> dict:
    """Decode tokens/s of every model and training step time of those that train, vs the original, one run."""
    from .bench import BenchSettings, bench

    dirs = {r.method: str(out / r.directory) for r in results}
    settings = BenchSettings(threads=config.threads, decode_batches=(1,), repeats=config.bench_repeats,
                             train_params="auto", prefill_tokens=256,
                             train_batch=config.bench_train_batch)  # fmt: skip
    baseline = dirs["original"]
    inference = bench(list(dirs.values()), baseline=baseline, settings=settings, phases=("inference",), on_step=on_step)
    packed = {r.method for r in results if r.method in QUANTIZED or r.method == "bondcut_int4"
              or (r.method == "joint" and r.perplexity_before_heal is None)}  # fmt: skip  # nothing float to train
    trainable = [d for m, d in dirs.items() if m not in packed]
    timed = len(trainable) > 1  # a baseline step time alone is no ratio: nothing else here trains
    training = (bench(trainable, baseline=baseline, settings=settings, phases=("training",), on_step=on_step)
                if timed else {"models": {}})  # fmt: skip
    speed = {}
    for method, d in dirs.items():
        ratios = {**inference.get("ratios", {}).get(d, {}), **training.get("ratios", {}).get(d, {})}
        speed[method] = dict(zip(SPEED_KEYS, (
            inference["models"][d]["inference"]["decode_b1_tokens_per_s"]["median"],
            ratios.get("decode_b1_speedup", 1.0 if d == baseline else None),
            training["models"].get(d, {}).get("training", {}).get("step_s", {}).get("median"),
            ratios.get("train_step_speedup", 1.0 if d == baseline and timed else None),
            inference["models"][d]["inference"]["peak_rss_mb"],
        )))  # fmt: skip
    return {"per_method": speed, "environment": inference["environment"], "settings": inference["settings"]}


def compare(
    original: str,
    out: str | Path,
    config: CompareConfig,
    on_stage: Callable[[str, str], None] | None = None,
    on_bench: Callable | None = None,
) -> dict:
    """Run every method of ``config`` on ``original``; write compare.json, compare.md and compare.png to ``out``."""
    from .compare_report import compare_markdown, plot_compare
    from .models import resolve_model
    from .serialization import load

    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    original = str(resolve_model(original))
    teacher = load(original)[0] if config.distill and config.heal_tokens else None
    methods = ("original", *(m for m in config.methods if m != "original"))  # the original is every ratio's base
    results = [run_method(m, original, out, config, teacher, on_stage) for m in methods]
    speed_file = out / "results" / "speed.json"
    done = json.loads(speed_file.read_text()) if speed_file.exists() else {"per_method": {}}
    for r in results:  # the original's architecture and size: its speed is the original's, not timed again
        if r.method in SAME_SHAPE:
            done["per_method"][r.method] = dict.fromkeys(SPEED_KEYS)
    missing = [r for r in results if r.method not in done["per_method"]]
    if missing:  # measured beside the original again: every ratio comes from one run
        fresh = measure_speed(out, [results[0], *(r for r in missing if r.method != "original")], config, on_bench)
        done = {**fresh, "per_method": {**done["per_method"], **{r.method: fresh["per_method"][r.method]
                                                                 for r in missing}}}  # fmt: skip
        atomic_write_text(speed_file, json.dumps(done, indent=2))
    speed = {**done, "per_method": {r.method: done["per_method"][r.method] for r in results}}
    report = {"original": Path(original).name, "config": asdict(config),
              "methods": [r.to_dict() for r in results], "speed": speed}  # fmt: skip
    atomic_write_text(out / "compare.json", json.dumps(report, indent=2))
    atomic_write_text(out / "compare.md", compare_markdown(report))
    plot_compare(report, out / "compare.png")
    return report
