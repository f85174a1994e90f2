"""Hugging Face config class of the delta_attnres decoder.

Model folders carry a copy of this file (and of the package modules it imports) so that
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` works without the package installed. It may
therefore import only transformers, torch, the standard library and sibling modules by relative import.
"""

# NOTE: no `from __future__ import annotations`, because transformers turns config subclasses into
# dataclasses and resolves their annotations at class creation.

from typing import Any

from transformers import PreTrainedConfig

from .config import ModelConfig
from .hf_format import MODEL_TYPE, hf_config_dict, model_config_from_hf_dict


class DeltaAttnResConfig(PreTrainedConfig):
    """Shape of the decoder in Llama field names, plus `qk_norm` (Qwen3) and the residual scheme.

    `residual` is a dict of `ResidualConfig` fields (`scheme`, `num_blocks`, `gate`, `implementation`).
    `rope_parameters` must describe the default RoPE. Every value is validated by building the
    package's `ModelConfig`, available as `to_model_config()`.
    """

    model_type = MODEL_TYPE

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = True
    residual: dict | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        # Validate every field and fill the defaults (head_dim, residual) the way ModelConfig does.
        model_config = self.to_model_config()
        self.head_dim = model_config.head_dim
        self.residual = hf_config_dict(model_config)["residual"]

    def to_model_config(self) -> ModelConfig:
        """Return the package's ModelConfig for this config, or raise ValueError naming an invalid field."""
        values = {
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope_parameters,
            "attention_bias": self.attention_bias,
            "qk_norm": self.qk_norm,
            "tie_word_embeddings": self.tie_word_embeddings,
            "residual": self.residual,
        }
        return model_config_from_hf_dict(values, origin=type(self).__name__)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> "DeltaAttnResConfig":
        """Build the Hugging Face config of `config`, with `kwargs` as token ids and other transformers fields."""
        values = hf_config_dict(config)
        for key in ("model_type", "architectures"):
            values.pop(key)
        values.update(kwargs)
        return cls(**values)


__all__ = ["DeltaAttnResConfig"]
