"""Slow, independent reference implementation of the decoder for every residual scheme.

Written from the definitions in "Attention Residuals" (Kimi Team, arXiv 2603.15031) and "Delta Attention
Residuals" (Luo, Cai and Hu, arXiv 2605.18855), without using the package's schemes, routing kernel or
module forwards. Every function takes the model's `state_dict()` (names in the Hugging Face Llama layout)
and its `ModelConfig`, and computes in the dtype of the given weights, so callers pass float64 copies to
get an exact reference. Nothing here is optimised: sources are Python lists, every routing call
normalises every source again, and block sums are recomputed from the stored states.

Sublayers are numbered from 0: sublayer 2i is the attention of layer i and 2i + 1 its MLP. `e` is the
token embedding. `states[k]` is the running residual state e + v_0 + ... + v_{k-1}, so states[0] = e.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from delta_attnres.config import ModelConfig

Params = Mapping[str, Tensor]

# Signature of a source rule: (e, outputs so far, states so far, sublayer, config) -> sources.
SourceRule = Callable[[Tensor, list[Tensor], list[Tensor], int, ModelConfig], list[Tensor]]
FinalRule = Callable[[Tensor, list[Tensor], list[Tensor], ModelConfig], list[Tensor]]

# Scheme name -> (source axis, routing), as defined by the two papers.
SCHEME_AXES = {
    "attnres_full": ("sublayer", "replacement"),
    "attnres_block": ("block", "replacement"),
    "delta": ("sublayer", "additive"),
    "delta_block": ("block", "additive"),
    "attnres_cumulative": ("cumulative", "replacement"),
    "delta_cumulative": ("cumulative", "additive"),
}


# Building blocks


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Apply RMSNorm over the last dimension: weight * x / sqrt(mean(x^2) + eps)."""
    return weight * (x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps))


def softmax(logits: Tensor, dim: int) -> Tensor:
    """Compute softmax explicitly, in float32 or wider."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shifted = wide - wide.max(dim=dim, keepdim=True).values
    exponentials = shifted.exp()
    return exponentials / exponentials.sum(dim=dim, keepdim=True)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def rotate_half(x: Tensor) -> Tensor:
    """Map the halves (x1, x2) of the last dimension to (-x2, x1), the Llama RoPE layout."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate x of shape (B, T, heads, E) by the angles of token positions (T,)."""
    head_dim = x.shape[-1]
    exponents = torch.arange(0, head_dim, 2, dtype=x.dtype) / head_dim
    inverse_frequencies = 1.0 / (theta**exponents)  # (E/2,)
    angles = positions.to(x.dtype)[:, None] * inverse_frequencies[None, :]  # (T, E/2)
    angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # (1, T, 1, E)
    return x * angles.cos() + rotate_half(x) * angles.sin()


def attention(params: Params, prefix: str, x: Tensor, config: ModelConfig) -> Tensor:
    """Compute causal grouped-query attention with RoPE, optional q/k/v bias and per-head q/k RMSNorm.

    The q/k RMSNorm (Qwen3) is applied before RoPE.
    """
    assert config.head_dim is not None
    batch, length, _ = x.shape
    num_heads, num_kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim

    def project(name: str, heads: int) -> Tensor:
        bias = params[f"{prefix}.{name}.bias"] if config.attention_bias else None
        return linear(x, params[f"{prefix}.{name}.weight"], bias).reshape(batch, length, heads, head_dim)

    q = project("q_proj", num_heads)
    k = project("k_proj", num_kv_heads)
    v = project("v_proj", num_kv_heads)
    if config.qk_norm:
        q = rms_norm(q, params[f"{prefix}.q_norm.weight"], config.rms_norm_eps)
        k = rms_norm(k, params[f"{prefix}.k_norm.weight"], config.rms_norm_eps)
    positions = torch.arange(length)
    q = apply_rope(q, positions, config.rope_theta)
    k = apply_rope(k, positions, config.rope_theta)

    # Each key/value head serves num_heads / num_kv_heads consecutive query heads.
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, E)
    scores = q @ k.transpose(-1, -2) / head_dim**0.5  # (B, H, T, T)
    future = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    weights = softmax(scores, dim=-1).to(v.dtype)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, num_heads * head_dim)
    return linear(out, params[f"{prefix}.o_proj.weight"])


def swiglu(params: Params, prefix: str, x: Tensor) -> Tensor:
    gate = linear(x, params[f"{prefix}.gate_proj.weight"])
    up = linear(x, params[f"{prefix}.up_proj.weight"])
    return linear(gate * torch.sigmoid(gate) * up, params[f"{prefix}.down_proj.weight"])


def sublayer(params: Params, config: ModelConfig, index: int, x: Tensor) -> Tensor:
    """Compute f_l(x): the pre-norm and the attention (even index) or MLP (odd index) of its layer."""
    layer = f"model.layers.{index // 2}"
    eps = config.rms_norm_eps
    if index % 2 == 0:
        return attention(
            params, f"{layer}.self_attn", rms_norm(x, params[f"{layer}.input_layernorm.weight"], eps), config
        )
    return swiglu(
        params, f"{layer}.mlp", rms_norm(x, params[f"{layer}.post_attention_layernorm.weight"], eps)
    )


def embed(params: Params, input_ids: Tensor) -> Tensor:
    return params["model.embed_tokens.weight"][input_ids]


def lm_logits(params: Params, config: ModelConfig, hidden: Tensor) -> Tensor:
    """Apply the final RMSNorm and the LM head (the embedding matrix when tied)."""
    normed = rms_norm(hidden, params["model.norm.weight"], config.rms_norm_eps)
    head = params["model.embed_tokens.weight"] if config.tie_embeddings else params["lm_head.weight"]
    return linear(normed, head)


# Plain pre-norm decoder


def plain_decoder_logits(params: Params, config: ModelConfig, input_ids: Tensor) -> Tensor:
    """Compute the logits of the standard pre-norm decoder: h_{l+1} = h_l + f_l(h_l)."""
    hidden = embed(params, input_ids)
    for index in range(2 * config.num_layers):
        hidden = hidden + sublayer(params, config, index, hidden)
    return lm_logits(params, config, hidden)


# Depth routing


def router_name(config: ModelConfig, index: int) -> str:
    """Return the parameter prefix of the router of sublayer `index` (2L is the final router)."""
    if index == 2 * config.num_layers:
        return "model.final_router"
    kind = "attn_router" if index % 2 == 0 else "mlp_router"
    return f"model.layers.{index // 2}.{kind}"


def route(params: Params, prefix: str, sources: list[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """Mix `sources` with softmax(w . RMSNorm_key(s_i)) and return the mix and the weights (S, B, T).

    A single source gets weight 1 and needs no query. The values are mixed without normalisation.
    """
    if len(sources) == 1:
        return sources[0].clone(), torch.ones((1, *sources[0].shape[:-1]), dtype=torch.float32)
    query = params[f"{prefix}.query"]
    gain = params[f"{prefix}.key_norm.weight"]
    logits = torch.stack(
        [(rms_norm(source, gain, eps) * query).sum(dim=-1) for source in sources]
    )  # (S, B, T)
    weights = softmax(logits, dim=0)
    mixed = torch.zeros_like(sources[0])
    for weight, source in zip(weights, sources, strict=True):
        mixed = mixed + weight.to(source.dtype).unsqueeze(-1) * source
    return mixed, weights


def sublayers_per_block(config: ModelConfig) -> int:
    return 2 * config.num_layers // config.residual.num_blocks


def block_of(config: ModelConfig, index: int) -> int:
    """Return the 0-based block of sublayer `index`."""
    return index // sublayers_per_block(config)


def block_delta(states: list[Tensor], config: ModelConfig, block: int) -> Tensor:
    """Return Delta_n = h(end of block) - h(start of block), computed from the stored states."""
    size = sublayers_per_block(config)
    return states[(block + 1) * size] - states[block * size]


def block_output_sum(outputs: list[Tensor], start: int, stop: int) -> Tensor:
    """Return the sum of outputs[start:stop], summed from the list rather than kept as a running sum."""
    return torch.stack(outputs[start:stop]).sum(dim=0)


def sublayer_sources(
    e: Tensor, outputs: list[Tensor], states: list[Tensor], index: int, config: ModelConfig
) -> list[Tensor]:
    """Return [e, v_0, ..., v_{l-1}]."""
    return [e.clone(), *(output.clone() for output in outputs)]


def cumulative_sources(
    e: Tensor, outputs: list[Tensor], states: list[Tensor], index: int, config: ModelConfig
) -> list[Tensor]:
    """Return the running states [h_1, ..., h_l] (states[0] = e)."""
    return [state.clone() for state in states[: index + 1]]


def attnres_block_sources(
    e: Tensor, outputs: list[Tensor], states: list[Tensor], index: int, config: ModelConfig
) -> list[Tensor]:
    """Return [b_0 = e, b_1, ..., b_{n-1}] plus the partial sum of the current block once it is non-empty."""
    size = sublayers_per_block(config)
    current = block_of(config, index)
    sources = [e.clone()]
    for block in range(current):
        sources.append(block_output_sum(outputs, block * size, (block + 1) * size))
    start = current * size
    if index > start:  # the partial sum resets at every block boundary
        sources.append(block_output_sum(outputs, start, index))
    return sources


def delta_block_sources(
    e: Tensor, outputs: list[Tensor], states: list[Tensor], index: int, config: ModelConfig
) -> list[Tensor]:
    """Return [e, Delta_1, ..., Delta_{c-1}]: the completed blocks only (the current one is already in h)."""
    current = block_of(config, index)
    return [e.clone(), *(block_delta(states, config, block) for block in range(current))]


def final_sublayer_sources(
    e: Tensor, outputs: list[Tensor], states: list[Tensor], config: ModelConfig
) -> list[Tensor]:
    return sublayer_sources(e, outputs, states, len(outputs), config)


def final_cumulative_sources(
    e: Tensor, outputs: list[Tensor], states: list[Tensor], config: ModelConfig
) -> list[Tensor]:
    return [state.clone() for state in states]


def final_block_sources(
    e: Tensor, outputs: list[Tensor], states: list[Tensor], config: ModelConfig
) -> list[Tensor]:
    """Return [b_0 = e, b_1, ..., b_N] after the last block."""
    size = sublayers_per_block(config)
    blocks = range(config.residual.num_blocks)
    return [e.clone(), *(block_output_sum(outputs, block * size, (block + 1) * size) for block in blocks)]


SOURCE_RULES: dict[str, SourceRule] = {
    "attnres_full": sublayer_sources,
    "attnres_block": attnres_block_sources,
    "delta": sublayer_sources,
    "delta_block": delta_block_sources,
    "attnres_cumulative": cumulative_sources,
    "delta_cumulative": cumulative_sources,
}
FINAL_RULES: dict[str, FinalRule] = {
    "attnres_full": final_sublayer_sources,
    "attnres_block": final_block_sources,
    "attnres_cumulative": final_cumulative_sources,
}


class Recorder:
    """Collects (sublayer, weights, number of sources) for every routing call of the reference."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Tensor, int]] = []

    def record(self, index: int, weights: Tensor, sources: list[Tensor]) -> None:
        self.calls.append((index, weights.detach(), len(sources)))


def routed_decoder_logits(
    params: Params,
    config: ModelConfig,
    input_ids: Tensor,
    *,
    source_rule: SourceRule | None = None,
    final_rule: FinalRule | None = None,
    final_routing: bool = True,
    recorder: Recorder | None = None,
) -> Tensor:
    """Compute the logits of a routed decoder for `config.residual.scheme`.

    Replacement routing: x_l = route(sources_l) and the output is route_final(final sources).
    Additive routing: x_l = h_l + [gate *] route(sources_l), h_{l+1} = h_l + v_l, output h_{2L+1}.
    `source_rule`, `final_rule` and `final_routing=False` replace parts of the scheme; tests use them to
    build deliberately wrong variants.
    """
    scheme = config.residual.scheme
    _, routing = SCHEME_AXES[scheme]
    source_rule = source_rule or SOURCE_RULES[scheme]
    eps = config.rms_norm_eps

    e = embed(params, input_ids)
    outputs: list[Tensor] = []
    states: list[Tensor] = [e]
    for index in range(2 * config.num_layers):
        prefix = router_name(config, index)
        sources = source_rule(e, outputs, states, index, config)
        mixed, weights = route(params, prefix, sources, eps)
        if recorder is not None and len(sources) > 1:
            recorder.record(index, weights, sources)
        if routing == "replacement":
            x = mixed
        else:
            gate = params[f"{prefix}.gate"] if config.residual.gate else 1.0
            x = states[-1] + gate * mixed
        output = sublayer(params, config, index, x)
        outputs.append(output)
        states.append(states[-1] + output)

    if routing == "replacement" and final_routing:
        final_sources = (final_rule or FINAL_RULES[scheme])(e, outputs, states, config)
        hidden, weights = route(params, "model.final_router", final_sources, eps)
        if recorder is not None:
            recorder.record(2 * config.num_layers, weights, final_sources)
    else:
        hidden = states[-1]
    return lm_logits(params, config, hidden)


def decoder_logits(params: Params, config: ModelConfig, input_ids: Tensor) -> Tensor:
    """Compute the logits of the decoder that `config` describes, for any scheme."""
    if config.residual.scheme == "standard":
        return plain_decoder_logits(params, config, input_ids)
    return routed_decoder_logits(params, config, input_ids)


def expected_num_sources(config: ModelConfig, index: int) -> int:
    """Return how many sources sublayer `index` routes over, or 0 where it does not route.

    Index 2L stands for the final routing before the output norm.
    """
    scheme = config.residual.scheme
    if scheme == "standard":
        return 0
    source_axis, routing = SCHEME_AXES[scheme]
    num_sublayers = 2 * config.num_layers
    if index == num_sublayers:
        if routing == "additive":
            return 0
        return config.residual.num_blocks + 1 if source_axis == "block" else num_sublayers + 1
    if source_axis != "block":
        return index + 1
    block = block_of(config, index)
    starts_block = index % sublayers_per_block(config) == 0
    if routing == "replacement" and not starts_block:
        return block + 2  # completed blocks, e and the partial sum
    return block + 1
