"""The `config.json` layout of a model folder, in Hugging Face field names, without importing transformers.

A model folder is a standard Hugging Face folder: `config.json` uses the field names of `LlamaConfig`
(`num_hidden_layers`, `num_attention_heads`, `rope_parameters`, ...) plus `qk_norm` and `residual`, and
its `auto_map` points at the modeling code copied into the folder. `ModelConfig` uses shorter names;
the two functions here translate between them. They only read and write dicts, so storage and the
command line can read a folder's config without the slow import of transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ModelConfig, ResidualConfig

MODEL_TYPE = "delta_attnres"
ARCHITECTURE = "DeltaAttnResForCausalLM"
CONFIG_CLASS = "DeltaAttnResConfig"
CONFIGURATION_MODULE = "configuration_delta_attnres"
MODELING_MODULE = "modeling_delta_attnres"
AUTO_MAP = {
    "AutoConfig": f"{CONFIGURATION_MODULE}.{CONFIG_CLASS}",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.{ARCHITECTURE}",
}

# ModelConfig field -> config.json field, for the fields whose names differ.
_RENAMED = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}
# ModelConfig fields stored under their own name. `rope_theta` and `residual` are handled separately.
_SAME_NAME = (
    "vocab_size",
    "hidden_size",
    "head_dim",
    "intermediate_size",
    "rms_norm_eps",
    "qk_norm",
    "attention_bias",
)


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """Return the config.json fields that describe `config` (no token ids, no auto_map)."""
    values: dict[str, Any] = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE]}
    for name in _SAME_NAME:
        values[name] = getattr(config, name)
    for name, hf_name in _RENAMED.items():
        values[hf_name] = getattr(config, name)
    values["hidden_act"] = "silu"
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    values["residual"] = dataclasses.asdict(config.residual)
    return values


def model_config_from_hf_dict(values: dict[str, Any], origin: str | None = None) -> ModelConfig:
    """Build the ModelConfig that a config.json dict describes, or raise ValueError naming a bad field.

    Fields that transformers adds (token ids, dtype, auto_map, ...) are ignored. A missing `residual`
    means the ResidualConfig defaults. `origin` (a path or a class name) starts every message when
    given. Without it the message names only the field, for a caller that adds the path itself.
    """
    try:
        return _model_config_from_hf_dict(values)
    except (TypeError, ValueError) as error:
        message = str(error) if origin is None else f"{origin}: {error}"
        raise ValueError(message) from error


def _model_config_from_hf_dict(values: dict[str, Any]) -> ModelConfig:
    if values.get("model_type") != MODEL_TYPE:
        raise ValueError(f"model_type is {values.get('model_type')!r}, expected {MODEL_TYPE!r}")
    missing = [
        hf_name
        for hf_name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        if values.get(hf_name) is None
    ]
    if missing:
        raise ValueError(f"required field(s) {', '.join(missing)} missing")
    activation = values.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"hidden_act is {activation!r}, but the decoder only implements 'silu'")

    fields: dict[str, Any] = {}
    for name in _SAME_NAME:
        if values.get(name) is not None:
            fields[name] = values[name]
    for name, hf_name in _RENAMED.items():
        if values.get(hf_name) is not None:
            fields[name] = values[hf_name]
    if fields.get("num_kv_heads") is None:
        fields["num_kv_heads"] = fields["num_heads"]
    fields["rope_theta"] = _rope_theta(values)
    residual = values.get("residual") or {}
    if not isinstance(residual, dict):
        raise ValueError(f"residual is {residual!r}, expected an object such as {{'scheme': 'delta'}}")
    fields["residual"] = ResidualConfig(**residual)
    return ModelConfig.from_dict(fields)


def _rope_theta(values: dict[str, Any]) -> float:
    """Return the RoPE base of a config dict, rejecting RoPE variants that the decoder does not implement."""
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters is {rope!r}, expected an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"RoPE type {rope_type!r} is not supported, because the decoder implements only the "
            "default (unscaled) rotary embedding"
        )
    factor = rope.get("partial_rotary_factor", values.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor {factor} is not supported, only 1.0")
    theta = rope.get("rope_theta", values.get("rope_theta", 10000.0))
    return float(theta)


def legacy_model_config(values: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the older config.json layout, which stored ModelConfig fields by name."""
    fields = {key: value for key, value in values.items() if key in ModelConfig.__dataclass_fields__}
    return ModelConfig.from_dict(fields)


def is_legacy_layout(values: dict[str, Any]) -> bool:
    """True for a config.json written before model folders used Hugging Face field names."""
    return "num_layers" in values and "num_hidden_layers" not in values
