"""A Llama / Qwen2 / Qwen3-style decoder whose sublayers read their input through a residual scheme.

Each transformer layer has two sublayers, attention and SwiGLU MLP, each with its own pre-norm. What a
sublayer reads is decided by the residual scheme (`schemes.py`): the plain residual stream, a routed
mix of earlier outputs in place of the stream (Attention Residuals, arXiv 2603.15031), or the stream
plus such a mix (Delta Attention Residuals, arXiv 2605.18855). Parameter names follow the Hugging Face
Llama layout (`model.layers.0.self_attn.q_proj.weight`, ...), so checkpoints map one-to-one; routing
parameters live under `attn_router`, `mlp_router` and `model.final_router`.

Shapes: B batch, T tokens (queries), K keys, D width, H query heads, G key/value heads, E head dim,
S sources, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .norm import rms_norm
from .routing import naive_route, route, route_norm
from .schemes import ResidualScheme, RoutingRecorder, Stream, build_scheme


class KVCache(Protocol):
    """Anything with the `update` method of a Hugging Face `Cache` (for example `DynamicCache`)."""

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Any: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Router(nn.Module):
    """The depth router of one sublayer: a query and a key-norm gain (and optionally a scalar gate).

    A router over a single source has no query (its weight is always 1); it exists only to hold a gate.
    """

    def __init__(self, dim: int, num_sources: int, eps: float, gate: bool, implementation: str) -> None:
        super().__init__()
        self.num_sources = num_sources
        self.eps = eps
        self.implementation = implementation
        if num_sources > 1:
            self.query = nn.Parameter(torch.zeros(dim))
            self.key_norm = RMSNorm(dim, eps)
        self.gate = nn.Parameter(torch.zeros(())) if gate else None

    def mix(self, sources: Sequence[Tensor], inv_rms: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Return the routed mix (B, T, D) and the routing weights (S, B, T) of `sources`."""
        if self.num_sources == 1:
            raise RuntimeError("a single-source router has no query; its source passes through with weight 1")
        if len(sources) != self.num_sources:
            raise RuntimeError(f"router built for {self.num_sources} sources received {len(sources)}")
        if self.implementation == "naive":
            return naive_route(self.query, self.key_norm.weight, sources, self.eps)
        return route(self.query, self.key_norm.weight, sources, inv_rms)

    def mix_norm(
        self, sources: Sequence[Tensor], inv_rms: Sequence[Tensor], norm: RMSNorm
    ) -> tuple[Tensor, Tensor]:
        """Return `norm` applied to the routed mix, and the routing weights (S, B, T).

        The fused implementation does not keep the mix for backward (see `routing.route_norm`).
        """
        if self.implementation == "naive" or self.num_sources == 1:
            mixed, weights = self.mix(sources, inv_rms)
            return norm(mixed), weights
        if len(sources) != self.num_sources:
            raise RuntimeError(f"router built for {self.num_sources} sources received {len(sources)}")
        return route_norm(self.query, self.key_norm.weight, sources, inv_rms, norm.weight, norm.eps)

    query: nn.Parameter
    key_norm: RMSNorm

    def extra_repr(self) -> str:
        return f"num_sources={self.num_sources}, gate={self.gate is not None}"


class RotaryEmbedding(nn.Module):
    inv_freq: Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq  # (B, T, E/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, E)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, E) by the per-position angles, in the Llama half-split layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1).to(x.dtype) + rotated * sin.unsqueeze(1).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias and optional per-head QK-norm."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        width, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache: KVCache | None,
    ) -> Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|G, T, E)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, G, K, E)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (B, H, T, E)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _make_router(config: ModelConfig, num_sources: int) -> Router | None:
    gate = config.residual.gate
    if num_sources > 1 or (num_sources == 1 and gate):
        return Router(
            config.hidden_size, num_sources, config.rms_norm_eps, gate, config.residual.implementation
        )
    return None


class DecoderLayer(nn.Module):
    """Attention then MLP, each reading its input through the residual scheme.

    stream --scheme.sublayer_input (with norm)--> attention --> v --scheme.advance--> stream
    stream --scheme.sublayer_input (with norm)--> MLP       --> v --scheme.advance--> stream
    """

    def __init__(self, config: ModelConfig, layer_idx: int, scheme: ResidualScheme) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.scheme = scheme
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.attn_router = _make_router(config, scheme.num_sources(2 * layer_idx))
        self.mlp_router = _make_router(config, scheme.num_sources(2 * layer_idx + 1))

    def forward(
        self, stream: Stream, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None
    ) -> Stream:
        attn_index, mlp_index = 2 * self.layer_idx, 2 * self.layer_idx + 1

        x = self.scheme.sublayer_input(stream, attn_index, self.attn_router, self.input_layernorm)
        output = self.self_attn(x, rope, mask, cache)
        stream = self.scheme.advance(stream, attn_index, output)

        x = self.scheme.sublayer_input(stream, mlp_index, self.mlp_router, self.post_attention_layernorm)
        output = self.mlp(x)
        return self.scheme.advance(stream, mlp_index, output)


def build_attention_mask(attention_mask: Tensor | None, query_length: int, past_length: int) -> Tensor | None:
    """Return a boolean (B|1, 1, T, K) mask for SDPA (True = may attend), or None for plain causal masking.

    `attention_mask` is the usual (B, K) 0/1 padding mask over past and current tokens.
    """
    key_length = past_length + query_length
    if attention_mask is None and past_length == 0:
        return None
    device = attention_mask.device if attention_mask is not None else None
    query_positions = torch.arange(past_length, key_length, device=device).unsqueeze(-1)  # (T, 1)
    key_positions = torch.arange(key_length, device=device).unsqueeze(0)  # (1, K)
    allowed = (key_positions <= query_positions).view(1, 1, query_length, key_length)
    if attention_mask is not None:
        if attention_mask.shape[-1] != key_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens but past + current tokens are {key_length}"
            )
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        # A padding query with no visible key would give NaN; let it attend to itself.
        allowed = allowed | (key_positions == query_positions).view(1, 1, query_length, key_length)
    return allowed


class Decoder(nn.Module):
    """Embedding, layers and final norm; returns the final hidden states (B, T, D)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.config = config
        self.scheme = build_scheme(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.scheme) for i in range(config.num_layers))
        self.final_router = _make_router(config, self.scheme.num_final_sources())
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        recorder: RoutingRecorder | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        embeddings = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        batch, length, _ = embeddings.shape
        past_length = cache.get_seq_length(0) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=embeddings.device)
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        rope = self.rotary(position_ids)
        mask = build_attention_mask(attention_mask, length, past_length)
        if mask is not None:
            mask = mask.to(embeddings.device)

        stream = self.scheme.begin(embeddings, recorder)
        for layer in self.layers:
            # A recorder is incompatible with recomputation: it would see every routing call twice.
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and recorder is None:
                stream = checkpoint(layer, stream, rope, mask, cache, use_reentrant=False)
            else:
                stream = layer(stream, rope, mask, cache)
        return self.scheme.output(stream, self.final_router, self.norm)


class DecoderLM(nn.Module):
    """The decoder with its language-model head; `forward` returns logits (B, T, V)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        init_weights(self)

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        return self.lm_head(self.model(input_ids, **kwargs))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled

    def parameter_counts(self) -> dict[str, int]:
        """Return unique parameter counts split into `base` (the decoder) and `routing` (routers)."""
        counts = {"base": 0, "routing": 0}
        for name, param in self.named_parameters():  # shared (tied) parameters are listed once
            counts["routing" if is_routing_parameter(name) else "base"] += param.numel()
        return counts


def is_routing_parameter(name: str) -> bool:
    """True for router parameters (queries, key-norm gains, gates), which get their own learning rate."""
    return "_router." in name


def init_weights(model: DecoderLM) -> None:
    """Initialise every parameter; this is the only place that does.

    - embeddings and linear weights: normal(0, init_std); the untied LM head likewise;
    - linear biases: zero; every RMSNorm gain (layer norms, QK-norms, key norms): one;
    - router queries: zero, so routing weights start uniform; router gates: zero, so an additive
      scheme with gates starts as the plain residual network.
    """
    std = model.config.init_std
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Router):
            if module.num_sources > 1:
                nn.init.zeros_(module.query)
            if module.gate is not None:
                nn.init.zeros_(module.gate)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
