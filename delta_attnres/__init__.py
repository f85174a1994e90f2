"""Depth routing for transformer decoders: Attention Residuals and Delta Attention Residuals.

The residual schemes follow "Attention Residuals" (Kimi Team, arXiv 2603.15031) and "Delta Attention
Residuals" (Luo, Cai and Hu, arXiv 2605.18855).
"""

__version__ = "0.1.0"

from .config import MODEL_PRESETS, PUBLISHED_SCHEMES, SCHEMES, ModelConfig, ResidualConfig
from .model import DecoderLM

# The Hugging Face classes load on first access: importing transformers' model classes takes several
# seconds. Accessing them (or importing delta_attnres.hf) registers them with the transformers Auto classes.
_HF_NAMES = ("DeltaAttnResConfig", "DeltaAttnResForCausalLM")


def __getattr__(name: str) -> object:
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODEL_PRESETS",
    "PUBLISHED_SCHEMES",
    "SCHEMES",
    "DecoderLM",
    "DeltaAttnResConfig",
    "DeltaAttnResForCausalLM",
    "ModelConfig",
    "ResidualConfig",
    "__version__",
]
