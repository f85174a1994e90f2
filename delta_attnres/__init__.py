"""Depth routing for transformer decoders: Attention Residuals and Delta Attention Residuals.

The residual schemes follow "Attention Residuals" (Kimi Team, arXiv 2603.15031) and "Delta Attention
Residuals" (Luo, Cai and Hu, arXiv 2605.18855).
"""

__version__ = "0.1.0"

from .config import MODEL_PRESETS, PUBLISHED_SCHEMES, SCHEMES, ModelConfig, ResidualConfig
from .model import DecoderLM

__all__ = [
    "MODEL_PRESETS",
    "PUBLISHED_SCHEMES",
    "SCHEMES",
    "DecoderLM",
    "ModelConfig",
    "ResidualConfig",
    "__version__",
]
