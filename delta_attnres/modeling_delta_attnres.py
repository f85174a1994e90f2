"""Hugging Face model class of the delta_attnres decoder: `from_pretrained`, `save_pretrained`, `generate`.

`DeltaAttnResForCausalLM` contains the package's `Decoder` as `model` and a linear `lm_head`, so its
parameter names are those of `DecoderLM` and of Hugging Face Llama checkpoints. Model folders carry a
copy of this file (and of the package modules it imports) so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without the package
installed. It may therefore import only transformers, torch, the standard library and sibling modules
by relative import.
"""

# NOTE: no `from __future__ import annotations`, because transformers resolves the annotations of model
# classes.

from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_delta_attnres import DeltaAttnResConfig
from .model import Decoder, RMSNorm, RotaryEmbedding, Router

# transformers 5.25 names the KV cache `cache` in forward arguments and outputs, and earlier 5.x releases
# used `past_key_values`. The model accepts both names and returns the cache under the field that the
# installed output class has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class DeltaAttnResPreTrainedModel(PreTrainedModel):
    """Weight initialisation and class settings shared by the delta_attnres model classes."""

    config_class = DeltaAttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]  # noqa: RUF012 (transformers reads it as a class attribute)
    # Attention always runs through torch's scaled_dot_product_attention, whatever
    # `attn_implementation` requests. Declaring SDPA support keeps transformers from choosing "eager".
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module as `model.init_weights` does for `DecoderLM`.

        The `transformers.initialization` functions skip tensors that were loaded from a checkpoint.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, Router):
            if module.num_sources > 1:
                init.zeros_(module.query)
            if module.gate is not None:
                init.zeros_(module.gate)
        elif isinstance(module, RotaryEmbedding):
            # inv_freq is a non-persistent buffer, so from_pretrained leaves it uninitialised.
            theta = float(self.config.rope_parameters["rope_theta"])
            half = module.inv_freq.shape[0]
            exponents = torch.arange(0, 2 * half, 2, dtype=torch.float32, device=module.inv_freq.device)
            init.copy_(module.inv_freq, 1.0 / (theta ** (exponents / (2 * half))))


class DeltaAttnResForCausalLM(DeltaAttnResPreTrainedModel, GenerationMixin):
    """The decoder with its language-model head, for `generate`, `Trainer` and evaluation harnesses.

    `forward` takes a 2-D (batch, past + current tokens) padding mask, optional `position_ids` (which
    `generate` derives from the mask, so left-padded batches get the positions of unpadded prompts) and
    a `Cache` such as `DynamicCache`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 (as above)

    def __init__(self, config: DeltaAttnResConfig) -> None:
        super().__init__(config)
        self.model = Decoder(config.to_model_config())
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Return logits (B, T, V), the loss when `labels` are given, and the cache when `use_cache`.

        `logits_to_keep` = n > 0 computes logits for the last n positions only (`generate` passes 1),
        and a 1-D tensor selects positions.
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"{type(self).__name__} does not support {flag}=True")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be a 2-D (batch, tokens) padding mask, got shape {tuple(attention_mask.shape)}"
            )

        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        reference = input_ids if input_ids is not None else inputs_embeds
        assert reference is not None
        past_length = cache.get_seq_length(0) if cache is not None else 0
        total_length = past_length + reference.shape[1]
        if total_length > self.config.max_position_embeddings:
            raise ValueError(
                f"{total_length} tokens (past {past_length} + current {reference.shape[1]}) exceed the "
                f"model's context of {self.config.max_position_embeddings} tokens (max_position_embeddings)"
            )

        hidden = self.model(
            input_ids,  # None when inputs_embeds is given
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
        )
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:, :]
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        cache_output: dict[str, Any] = {_CACHE_FIELD: cache}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_output)


__all__ = ["DeltaAttnResForCausalLM", "DeltaAttnResPreTrainedModel"]
