"""Teach transformers to load bondcut directories with its own ``AutoModelForCausalLM.from_pretrained``.

A compressed model's ``config.json`` carries ``quantization_config = {"quant_method": "bondcut_mpo", ...}``
with the layout of every MPO layer. Importing this module registers that method with transformers
(``register_quantization_config`` / ``register_quantizer``, the route torchao and optimum-quanto take): before
the weights load, the quantizer swaps each listed ``nn.Linear``/``Conv1D`` for an empty :class:`MPOLinear`
of the recorded shape, so the safetensors cores land in the right parameters.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .mpo_linear import MPOLinear

QUANT_METHOD = "bondcut_mpo"
FORMAT_VERSION = 2  # 2: packed 8/4-bit layers ("quantized")


class BondcutMPOConfig(QuantizationConfigMixin):
    """The MPO layout of every replaced layer: ``layers = {module_name: MPOLinear.layout()}``."""

    def __init__(self, layers: dict[str, dict] | None = None, format_version: int = FORMAT_VERSION, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"this directory uses bondcut MPO format {format_version}, but this bondcut reads up to "
                f"{FORMAT_VERSION}; upgrade bondcut (pip install -U bondcut)"
            )
        self.format_version = format_version
        self.layers = dict(layers or {})
        self.extra = {k: v for k, v in kwargs.items() if k != "quant_method"}  # e.g. the compression plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "layers": self.layers,
            **self.extra,
        }


class BondcutMPOQuantizer(HfQuantizer):
    """Rebuilds MPOLinear modules from the config's layout before transformers loads the weights."""

    requires_calibration = True  # an MPO model is made by bondcut.compress, not at load time

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .quant import install_quant_layers

        install_mpo_layers(model, self.quantization_config.layers)
        install_quant_layers(model, self.quantization_config.extra.get("quantized", {}))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(BondcutMPOConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(BondcutMPOQuantizer)


def install_mpo_layers(model: nn.Module, layers: dict[str, dict]) -> None:
    """Swap each named module for an uninitialized MPOLinear of the recorded layout (same device/dtype)."""
    from .surgery import dense_weight, set_submodule

    for name, layout in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"config.json lists MPO layer {name!r}, which this model does not have") from err
        weight = dense_weight(old)
        replaced = layout.get("replaced_shape", layout["shape"])  # a narrowed layer records what it replaced
        if list(weight.shape) != list(replaced):
            raise ValueError(f"MPO layer {name}: recorded shape {replaced} != model's {list(weight.shape)}")
        new = MPOLinear(
            layout["sites"],
            layout["bond_dims"],
            bias=layout["bias"],
            source_kind=layout.get("source_kind", "linear"),
            device=weight.device,
            dtype=weight.dtype,
            replaced_shape=layout.get("replaced_shape"),
        )
        set_submodule(model, name, new)


def mpo_layouts(model: nn.Module) -> dict[str, dict]:
    """The layout of every MPOLinear in ``model``, keyed by module name."""
    return {name: m.layout() for name, m in model.named_modules() if isinstance(m, MPOLinear)}


def attach_layout_config(model: nn.Module, **extra: Any) -> None:
    """Write the model's current MPO and packed-layer layouts into ``model.config.quantization_config``."""
    from .quant import quant_layouts

    previous = getattr(model.config, "quantization_config", None)
    kept = previous.extra if isinstance(previous, BondcutMPOConfig) else {}
    quantized = quant_layouts(model)
    if quantized:
        extra = {**extra, "quantized": quantized}
    else:
        kept.pop("quantized", None)
    version = FORMAT_VERSION if quantized else 1  # MPO-only directories stay readable by bondcut 0.1 readers
    merged = {k: v for k, v in {**kept, **extra}.items() if v is not None}  # None clears an entry
    model.config.quantization_config = BondcutMPOConfig(layers=mpo_layouts(model), format_version=version, **merged)


def pending_packing(model: nn.Module) -> dict | None:
    """The packing a deferred joint compression left in the model's config (None when there is none; written
    by ``compress(..., CompressConfig(target_bytes=..., defer_packing=True))``, applied by
    :func:`bondcut.joint.apply_pending_packing`)."""
    quant = getattr(model.config, "quantization_config", None)
    extra = getattr(quant, "extra", None) or {}
    return extra.get("pending_packing")


def has_bondcut_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds MPO or packed layers (or a pending packing) that config.json must describe."""
    from .quant import quant_layouts

    mpo = any(isinstance(m, MPOLinear) for m in model.modules())
    return mpo or bool(quant_layouts(model)) or pending_packing(model) is not None
