"""Weight-only 8/4-bit quantization, packed group-wise (:mod:`.packing`), as layers (:mod:`.modules`) swapped
into a model (:mod:`.apply`)."""

from .apply import QuantizeConfig, QuantizeReport, install_quant_layers, quant_layouts, quantize_model
from .kernels import set_packed_kernels
from .modules import QuantEmbedding, QuantLinear, QuantMPOLinear, TiedQuantHead
from .packing import PackedTensor, dequantize, quantize

__all__ = [
    "PackedTensor",
    "QuantEmbedding",
    "QuantLinear",
    "QuantMPOLinear",
    "QuantizeConfig",
    "QuantizeReport",
    "TiedQuantHead",
    "dequantize",
    "install_quant_layers",
    "quant_layouts",
    "quantize",
    "quantize_model",
    "set_packed_kernels",
]
