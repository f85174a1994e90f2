"""Configuration dataclasses for the decoder and its residual scheme, validated when built.

A residual scheme is a choice on two axes: which *sources* a sublayer routes over, and how the routed
mix enters the sublayer (*routing*). The five published schemes are named presets of these axes, from
"Attention Residuals" (Kimi Team, arXiv 2603.15031) and "Delta Attention Residuals" (Luo, Cai and Hu,
arXiv 2605.18855).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SOURCE_KINDS = ("none", "sublayer", "block", "cumulative")
ROUTING_KINDS = ("none", "replacement", "additive")
ROUTE_IMPLEMENTATIONS = ("fused", "naive")

# Scheme name -> (sources, routing). The first five are the published presets; the two cumulative
# schemes route over the running states h_1..h_l and exist for ablations only.
SCHEMES: dict[str, tuple[str, str]] = {
    "standard": ("none", "none"),
    "attnres_full": ("sublayer", "replacement"),
    "attnres_block": ("block", "replacement"),
    "delta": ("sublayer", "additive"),
    "delta_block": ("block", "additive"),
    "attnres_cumulative": ("cumulative", "replacement"),
    "delta_cumulative": ("cumulative", "additive"),
}
PUBLISHED_SCHEMES = ("standard", "attnres_full", "attnres_block", "delta", "delta_block")


# Fields that the command line sets with a flag of the same name (`num_heads` -> `--num-heads`).
_FLAG_FIELDS = {
    "model": {"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"},
    "residual": {"scheme", "num_blocks"},
}


def _fail(owner: str, name: str, value: Any, allowed: str) -> ValueError:
    flag = f" (--{name.replace('_', '-')})" if name in _FLAG_FIELDS.get(owner, ()) else ""
    return ValueError(f"{owner}.{name} = {value!r}{flag} is invalid: expected {allowed}")


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _fail(owner, name, value, "a positive integer")


@dataclass
class ResidualConfig:
    """How sublayers read their input: the scheme name and its block count.

    `num_blocks` groups the transformer layers into blocks of `num_layers // num_blocks` consecutive
    layers; only the block schemes read it. `gate` adds a scalar gate per router, initialised to zero,
    so that an additive scheme starts as the plain residual network exactly (used when converting
    pretrained checkpoints). `implementation` selects the routing kernel: "fused" (the default) or the
    "naive" stacking version kept as a reference.
    """

    scheme: str = "delta"
    num_blocks: int = 4
    gate: bool = False
    implementation: str = "fused"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise _fail("residual", "scheme", self.scheme, f"one of {', '.join(SCHEMES)}")
        _check_positive("residual", num_blocks=self.num_blocks)
        if self.implementation not in ROUTE_IMPLEMENTATIONS:
            raise _fail("residual", "implementation", self.implementation, "'fused' or 'naive'")
        if self.gate and self.routing != "additive":
            raise _fail(
                "residual",
                "gate",
                self.gate,
                f"False for scheme {self.scheme!r} (gates need additive routing)",
            )

    @property
    def sources(self) -> str:
        return SCHEMES[self.scheme][0]

    @property
    def routing(self) -> str:
        return SCHEMES[self.scheme][1]


@dataclass
class ModelConfig:
    """Shape of a Llama / Qwen2 / Qwen3-style decoder and its residual scheme.

    `head_dim` defaults to `hidden_size // num_heads`; Qwen3 sets it independently of the width.
    `attention_bias` adds biases to the q/k/v projections (Qwen2); `qk_norm` applies a per-head
    RMSNorm to queries and keys before RoPE (Qwen3).
    """

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 384
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False
    attention_bias: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    residual: ResidualConfig = field(default_factory=ResidualConfig)

    def __post_init__(self) -> None:
        if isinstance(self.residual, dict):
            self.residual = ResidualConfig(**self.residual)
        _check_positive(
            "model",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_seq_len=self.max_seq_len,
        )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise _fail(
                    "model",
                    "num_heads",
                    self.num_heads,
                    f"a divisor of hidden_size={self.hidden_size}; on the command line, pass a "
                    "--hidden-size divisible by --num-heads (in Python, head_dim may be set instead)",
                )
            self.head_dim = self.hidden_size // self.num_heads
        _check_positive("model", head_dim=self.head_dim)
        if self.head_dim % 2:
            raise _fail("model", "head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise _fail(
                "model", "num_kv_heads", self.num_kv_heads, f"a divisor of num_heads={self.num_heads}"
            )
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise _fail("model", name, value, "a positive number")
        if self.residual.sources == "block" and self.num_layers % self.residual.num_blocks:
            raise _fail(
                "residual",
                "num_blocks",
                self.residual.num_blocks,
                f"a divisor of num_layers={self.num_layers} for scheme {self.residual.scheme!r}",
            )

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_layers

    def base_parameter_count(self) -> int:
        """Count the parameters outside the routers from the shape alone, without building the model.

        The result equals `DecoderLM(config).parameter_counts()["base"]`. Routers add at most
        2 * hidden_size + 1 parameters per sublayer.
        """
        assert self.head_dim is not None
        width, head_dim = self.hidden_size, self.head_dim
        query_width, kv_width = self.num_heads * head_dim, self.num_kv_heads * head_dim
        attention = width * query_width + 2 * width * kv_width + query_width * width
        if self.attention_bias:
            attention += query_width + 2 * kv_width
        if self.qk_norm:
            attention += 2 * head_dim
        mlp = 3 * width * self.intermediate_size
        layer = attention + mlp + 2 * width  # two RMSNorm gains per layer
        embeddings = self.vocab_size * width * (1 if self.tie_embeddings else 2)
        return embeddings + self.num_layers * layer + width  # the final RMSNorm gain

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return cls(**_checked_keys(cls, values, "model"))

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with `changes` applied; `residual` may be a dict of residual fields to change."""
        residual = changes.pop("residual", None)
        if isinstance(residual, dict):
            residual = dataclasses.replace(
                self.residual, **_checked_keys(ResidualConfig, residual, "residual")
            )
        values = self.to_dict()
        values["residual"] = residual if residual is not None else self.residual
        values.update(_checked_keys(ModelConfig, changes, "model"))
        return ModelConfig.from_dict(values)


def _checked_keys(cls: type, values: dict[str, Any], owner: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {owner} field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
        )
    values = dict(values)
    if cls is ModelConfig and isinstance(values.get("residual"), dict):
        values["residual"] = ResidualConfig(**_checked_keys(ResidualConfig, values["residual"], "residual"))
    return values


# Model sizes by name. `tiny` trains in seconds (tests); `small` is the default of `compare` and fits
# five schemes in about 15 minutes on a 2-core CPU; `paper-220m` is the 220M shape of the Delta paper
# (D 768, 12 layers, Qwen3-style) and needs a GPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=192
    ),
    "small": dict(
        vocab_size=4096, hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=384
    ),
    "base": dict(
        vocab_size=8192, hidden_size=256, num_layers=12, num_heads=8, num_kv_heads=4, intermediate_size=768
    ),
    "paper-220m": dict(
        vocab_size=32768,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=2048,
        qk_norm=True,
        max_seq_len=2048,
    ),
}


def model_config_from_preset(preset: str, **changes: Any) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(MODEL_PRESETS)}")
    values = dict(MODEL_PRESETS[preset])
    residual = changes.pop("residual", None)
    values.update(changes)
    config = ModelConfig.from_dict(values)
    if residual is not None:
        config = config.replace(residual=residual)
    return config
