"""Hugging Face integration: importing this module registers the model with the transformers Auto classes.

After `import delta_attnres.hf`, `AutoConfig.from_pretrained(folder)` and
`AutoModelForCausalLM.from_pretrained(folder)` load a model folder without `trust_remote_code`. Without
the import, `trust_remote_code=True` loads the copy of the modeling code stored in the folder.
`import delta_attnres` alone does not register the classes, because importing the transformers model
classes takes several seconds and every command-line call would pay for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_delta_attnres import DeltaAttnResConfig
from .hf_format import MODEL_TYPE
from .model import DecoderLM
from .modeling_delta_attnres import DeltaAttnResForCausalLM, DeltaAttnResPreTrainedModel

AutoConfig.register(MODEL_TYPE, DeltaAttnResConfig, exist_ok=True)
AutoModelForCausalLM.register(DeltaAttnResConfig, DeltaAttnResForCausalLM, exist_ok=True)
# With an auto class set, `save_pretrained` copies the modeling code into the folder and writes the
# matching `auto_map`, as `storage.save_model_folder` does.
DeltaAttnResConfig.register_for_auto_class()
DeltaAttnResForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def to_hf_model(model: DecoderLM, **config_fields: object) -> DeltaAttnResForCausalLM:
    """Return a DeltaAttnResForCausalLM with the weights of `model` (copied; same dtype and device).

    `config_fields` add transformers config fields such as token ids.
    """
    config = DeltaAttnResConfig.from_model_config(model.config, **config_fields)
    first = next(model.parameters())
    hf_model = DeltaAttnResForCausalLM(config)
    module: torch.nn.Module = hf_model  # transformers' wrapper of `to` hides nn.Module's signature from mypy
    module.to(device=first.device, dtype=first.dtype)
    hf_model.load_state_dict(model.state_dict(), strict=True)
    hf_model.eval()
    return hf_model


def from_hf_model(hf_model: DeltaAttnResForCausalLM) -> DecoderLM:
    """Return a DecoderLM with the weights of `hf_model` (copied; same dtype and device)."""
    model_config = hf_model.config.to_model_config()
    first = next(hf_model.parameters())
    model = DecoderLM(model_config).to(device=first.device, dtype=first.dtype)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model


def load_hf_model(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DeltaAttnResForCausalLM:
    """Load a model folder as a DeltaAttnResForCausalLM in eval mode, after the checks of storage.

    The folder's config, weight names, shapes and dtypes and tokenizer size are validated first, and
    the loaded weights must be finite, so that a bad folder gives one StorageError naming the problem
    instead of a transformers traceback. A model too large for the memory of `device` raises ValueError
    before anything is allocated.
    """
    from .hf_format import is_legacy_layout
    from .runconfig import check_finite_weights, check_loadable_model_folder
    from .storage import load_model_folder, read_config_json

    folder = Path(folder)
    files = check_loadable_model_folder(folder, device, weight_bytes=dtype.itemsize)
    if is_legacy_layout(read_config_json(folder)):
        # Folders written before the Hugging Face layout have no config that transformers can read.
        model = to_hf_model(load_model_folder(folder).to(dtype))
    else:
        model = DeltaAttnResForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    check_finite_weights(model.state_dict(), files, folder)
    module: torch.nn.Module = model  # transformers' wrapper of `to` hides nn.Module's signature from mypy
    module.to(device)
    model.eval()
    return model


__all__ = [
    "DeltaAttnResConfig",
    "DeltaAttnResForCausalLM",
    "DeltaAttnResPreTrainedModel",
    "from_hf_model",
    "load_hf_model",
    "to_hf_model",
]
