"""Text generation from a model folder with transformers' `generate` and a KV cache.

This module imports transformers at import time; the command line imports it only for `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from .runconfig import MAX_SEED


@dataclass
class GenerationSettings:
    """Decoding settings; greedy unless `do_sample`. `top_k` 0 and `top_p` 1.0 disable those filters."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens = {self.max_new_tokens!r} (--max-new-tokens) is invalid: expected a positive integer"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"temperature = {self.temperature!r} (--temperature) is invalid: expected a positive number"
            )
        if self.top_k < 0:
            raise ValueError(
                f"top_k = {self.top_k!r} (--top-k) is invalid: expected 0 (off) or a positive integer"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p!r} (--top-p) is invalid: expected a number in (0, 1]")
        if isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(
                f"seed = {self.seed!r} (--seed) is invalid: expected an integer from 0 to {MAX_SEED}"
            )


def check_prompt(prompt: str) -> None:
    """Raise ValueError for an empty prompt or one that is not valid UTF-8 text.

    Python decodes command-line bytes that are not UTF-8 into lone surrogates (U+DC80 to U+DCFF), which
    no tokenizer can encode.
    """
    if not prompt:
        raise ValueError("the prompt is empty; pass some text with --prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(prompt[error.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise ValueError(
            f"--prompt is not valid UTF-8: invalid {byte} at character {error.start}; "
            "pass the prompt as UTF-8 text"
        ) from None


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    """Return the (1, T) token ids of `prompt`, wrapped in the tokenizer's chat template when `chat`."""
    check_prompt(prompt)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: the model's tokenizer has no chat template; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


def check_context(prompt_length: int, max_new_tokens: int, context: int) -> None:
    """Raise ValueError unless the prompt and the new tokens fit the model's context."""
    if prompt_length + max_new_tokens > context:
        raise ValueError(
            f"the prompt has {prompt_length} tokens and --max-new-tokens is {max_new_tokens}, "
            f"{prompt_length + max_new_tokens} in all, but the model's context is {context} tokens; "
            "shorten the prompt or lower --max-new-tokens"
        )


def generate_text(
    model_dir: str | Path,
    prompt: str,
    settings: GenerationSettings,
    chat: bool = False,
    device: str = "cpu",
    stream: TextIO | None = None,
    tokenizer_dir: str | Path | None = None,
) -> str:
    """Generate a continuation of `prompt` and return it (without the prompt).

    With `stream`, the prompt and the tokens are written to it as they are generated. `tokenizer_dir`
    replaces the model folder's own tokenizer; it must not have more tokens than the model's vocabulary.
    """
    from .data import load_tokenizer
    from .hf import load_hf_model

    check_prompt(prompt)  # before the model is loaded
    model = load_hf_model(model_dir, device=device)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    if tokenizer_dir and len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"--tokenizer {tokenizer_dir} has {len(tokenizer)} tokens, but the model's vocabulary has "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with"
        )
    input_ids = encode_prompt(tokenizer, prompt, chat)
    check_context(input_ids.shape[1], settings.max_new_tokens, model.config.max_position_embeddings)

    streamer = None
    if stream is not None:
        streamer = FileStreamer(tokenizer, stream, skip_prompt=chat, skip_special_tokens=True)
    sampling: dict[str, Any] = {}
    if settings.do_sample:
        sampling = dict(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    torch.manual_seed(settings.seed)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        input_ids.to(model.device),
        attention_mask=torch.ones_like(input_ids).to(model.device),
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        pad_token_id=pad_token_id,
        streamer=streamer,
        **sampling,
    )
    return str(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))


class FileStreamer(TextStreamer):
    """A TextStreamer that writes to a given text file instead of stdout."""

    def __init__(self, tokenizer: Any, file: TextIO, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.file = file

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.file.write(text)
        if stream_end:
            self.file.write("\n")
        self.file.flush()
