"""Tiny models, tokenizers and subprocess helpers shared by the Hugging Face integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from delta_attnres.config import ModelConfig, ResidualConfig
from delta_attnres.data import Document, train_tokenizer
from delta_attnres.model import DecoderLM

TOKENIZER_VOCAB = 300
TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York. "
    "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
)


def tiny_tokenizer() -> Any:
    """Return a byte-level BPE with TOKENIZER_VOCAB tokens; "<|endoftext|>" (id 0) is eos, bos and pad."""
    documents = [Document(f"doc{i}", TEXT * (i + 1)) for i in range(4)]
    return train_tokenizer(documents, vocab_size=TOKENIZER_VOCAB)


def tiny_config(
    scheme: str = "delta", num_blocks: int = 2, gate: bool = False, **changes: Any
) -> ModelConfig:
    values: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_seq_len=64,
        init_std=0.1,
    )
    values.update(changes)
    return ModelConfig(residual=ResidualConfig(scheme=scheme, num_blocks=num_blocks, gate=gate), **values)


def randomize_routing(model: DecoderLM, seed: int = 0) -> DecoderLM:
    """Give every router a random query, key-norm gain and gate, so routing weights are not uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_router." in name:
                noise = torch.randn(param.shape, generator=generator)
                if name.endswith("key_norm.weight"):
                    param.copy_(1.0 + 0.3 * noise)
                elif name.endswith("query"):
                    # Routing logits of order one: far from uniform, but not so sharp that the softmax
                    # amplifies float32 rounding beyond the tests' 1e-5 tolerances.
                    param.copy_(0.3 * noise)
                else:
                    param.copy_(noise)
    return model


def tiny_model(scheme: str = "delta", seed: int = 0, **config_changes: Any) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(tiny_config(scheme, **config_changes))
    return randomize_routing(model, seed).eval()


def run_python(code: str, tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh Python process with a private transformers module cache, offline."""
    env = dict(os.environ)
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path
    )
