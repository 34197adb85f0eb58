"""bondcut: make causal LMs small with Matrix Product Operators (CompactifAI-style), and prove it.

Public API::

    import bondcut
    model, tok = bondcut.load("smollm2-135m")
    report = bondcut.compress(model, bondcut.CompressConfig(ratio=0.5), tokenizer=tok)
    bondcut.save(model, "smollm2-50", tokenizer=tok)
    model, tok = bondcut.load("smollm2-50")
    bondcut.heal(model, tok, bondcut.HealConfig(tokens=262144))  # short retraining of the cores
    bondcut.tune(model)  # per layer, the fastest exact way to run inference on this machine
    bondcut.quantize_model(model, bondcut.QuantizeConfig(bits=4))  # then pack what is not an MPO to 4 bits
    # or, in one step from the original: CompressConfig(target_bytes=60_000_000), MPO + packing + block deletion

Importing bondcut registers its MPO format with transformers, so ``AutoModelForCausalLM.from_pretrained``
reloads saved directories. Optional heavy libraries (lm_eval, matplotlib) are imported only where used.
"""

from . import hf_integration  # noqa: F401  (registers the "bondcut_mpo" loader with transformers)
from .allocate import Plan
from .config import CompressConfig
from .heal import HealConfig, heal
from .models import resolve_model
from .mpo_linear import MPOLinear
from .quant import QuantizeConfig, quantize_model
from .serialization import export_dense, load, save
from .surgery import CompressionReport, compress
from .tune import tune

__version__ = "0.1.0"

__all__ = [
    "CompressConfig",
    "CompressionReport",
    "HealConfig",
    "Plan",
    "heal",
    "MPOLinear",
    "QuantizeConfig",
    "compress",
    "export_dense",
    "quantize_model",
    "load",
    "resolve_model",
    "save",
    "tune",
]
