"""Writing files so that a crash leaves either the old file or the complete new one, and model folders.

A model folder holds `config.json` (the model config with `model_type` "delta_attnres"),
`model.safetensors` and, when given, the tokenizer files. Loading reads only JSON and safetensors, so it
never unpickles data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import DecoderLM

MODEL_TYPE = "delta_attnres"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class StorageError(RuntimeError):
    """A file or folder that cannot be read or written as requested; the message names it."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def replace_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with `fill(tmp_folder)`, then swap it in place of `target`.

    If the process dies before the swap, `target` is untouched. The swap itself is two renames; between
    them the previous folder exists as `<target>.old`, which the next call removes.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def model_config_dict(config: ModelConfig) -> dict[str, Any]:
    return {"model_type": MODEL_TYPE, **config.to_dict()}


def save_model_folder(model: DecoderLM, folder: Path, tokenizer: Any | None = None) -> None:
    """Write `model` (and `tokenizer`, a Hugging Face tokenizer) into `folder`, replacing it atomically."""

    def fill(tmp: Path) -> None:
        write_json_atomic(tmp / CONFIG_NAME, model_config_dict(model.config))
        save_file(weights_for_saving(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    replace_folder(folder, fill)


def weights_for_saving(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Return the state dict without the tied LM head (safetensors refuses shared storage)."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def read_model_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise StorageError(
            f"model folder {folder} has no {CONFIG_NAME}; pass a folder written by train or convert"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StorageError(f"{path} is not valid JSON ({error}); the file is damaged") from error
    if values.get("model_type") != MODEL_TYPE:
        raise StorageError(
            f"{path} has model_type {values.get('model_type')!r}, expected {MODEL_TYPE!r}; "
            "convert Hugging Face checkpoints with `delta-attnres convert` first"
        )
    fields = {key: value for key, value in values.items() if key in ModelConfig.__dataclass_fields__}
    return ModelConfig.from_dict(fields)


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu") -> DecoderLM:
    """Load a model folder written by `save_model_folder`; reads only JSON and safetensors."""
    folder = Path(folder)
    config = read_model_config(folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise StorageError(f"model folder {folder} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise StorageError(
            f"cannot read {weights_path}: {error}; the file is truncated or damaged"
        ) from error
    model = DecoderLM(config).to(device)
    load_weights(model, state, str(weights_path))
    return model


def load_weights(model: DecoderLM, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copy `state` into `model`, rejecting missing, unexpected or mis-shaped tensors by name."""
    expected = model.state_dict()
    optional = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StorageError(
            f"{origin} does not match the model config: missing {missing[:5] or 'none'}, "
            f"unexpected {unexpected[:5] or 'none'}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise StorageError(
                f"{origin}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
