"""Conversion of pretrained Llama, Qwen2 and Qwen3 checkpoints into a model with a routed residual scheme.

The transformer weights are copied unchanged (the parameter names are the same) and the routers are new,
initialised as `init_weights` does: queries zero, key-norm gains one. Before training, the converted
model computes the source model's function:

- additive schemes (`delta`, `delta_block`, `delta_cumulative`) get a scalar gate per router,
  initialised to zero, so each sublayer reads x = h + 0 * route(...) = h exactly; the logits match the
  source up to floating-point rounding, whatever the RMSNorm eps;
- `standard` is the source architecture itself;
- the replacement schemes `attnres_full` and `attnres_block` have no residual stream. With zero queries
  the weights are uniform and the sources sum to h, so a sublayer reads x = h / n for n sources, and its
  pre-norm computes g * h / sqrt(mean(h^2) + n^2 * eps) instead of g * h / sqrt(mean(h^2) + eps). The
  function is the source's only up to this larger effective eps, so the logits differ noticeably for
  small activations or deep models;
- `attnres_cumulative` averages the running states h_1 .. h_l, which is not the source function at
  all, so it is rejected.

`convert_checkpoint` measures the largest logit difference from the transformers model on a probe batch
and writes nothing when it exceeds the tolerance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import SCHEMES, ModelConfig, ResidualConfig
from .model import DecoderLM
from .runconfig import FP32_BYTES, check_inference_memory
from .storage import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    StorageError,
    check_output_path,
    check_weight_names,
    model_folder_problem,
    read_config_json,
    read_weights,
    save_model_folder,
    weight_files,
)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Maximum absolute logit difference from the source model, in float32. Additive schemes and `standard`
# reproduce the source computation and differ only by rounding. Replacement schemes change the
# effective RMSNorm eps (see the module docstring), so there is no default that holds for every
# checkpoint: they must be converted with an explicit tolerance.
EXACT_TOLERANCE = 1e-5
PROBE_BATCH = 2
PROBE_LENGTH = 32
PROBE_SEED = 0
# Tensors that some checkpoints carry but that the decoder recomputes.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted exactly; the message names the reason."""


@dataclass
class ConversionResult:
    config: ModelConfig
    max_logit_diff: float
    max_abs_logit: float
    tolerance: float
    out_dir: Path


def is_exact_scheme(scheme: str) -> bool:
    """True for the schemes whose converted model reproduces the source up to rounding."""
    return scheme == "standard" or SCHEMES[scheme][1] == "additive"


def source_model_config(source_config: Any, residual: ResidualConfig) -> ModelConfig:
    """Map a transformers Llama, Qwen2 or Qwen3 config onto a ModelConfig with `residual`.

    Raises ConversionError for architectures and options the decoder does not implement.
    """
    model_type = getattr(source_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"model_type {model_type!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _reject_unsupported_options(source_config, model_type)

    num_heads = source_config.num_attention_heads
    head_dim = getattr(source_config, "head_dim", None) or source_config.hidden_size // num_heads
    rope = source_config.rope_parameters or {}
    return ModelConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        num_layers=source_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=source_config.num_key_value_heads or num_heads,
        head_dim=head_dim,
        intermediate_size=source_config.intermediate_size,
        max_seq_len=source_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=float(source_config.rms_norm_eps),
        qk_norm=model_type == "qwen3",
        # Qwen2 always has q/k/v biases; Llama and Qwen3 have none (attention_bias=True is rejected).
        attention_bias=model_type == "qwen2",
        tie_embeddings=bool(source_config.tie_word_embeddings),
        init_std=float(getattr(source_config, "initializer_range", 0.02) or 0.02),
        residual=residual,
    )


def _reject_unsupported_options(source_config: Any, model_type: str) -> None:
    def reject(reason: str) -> None:
        raise ConversionError(f"cannot convert this {model_type} checkpoint: {reason}")

    activation = getattr(source_config, "hidden_act", "silu")
    if activation != "silu":
        reject(f"hidden_act {activation!r} is not supported, only 'silu' (SwiGLU)")
    if getattr(source_config, "mlp_bias", False):
        reject("mlp_bias=True is not supported (the MLP has no biases)")
    if model_type in ("llama", "qwen3") and getattr(source_config, "attention_bias", False):
        reject("attention_bias=True adds an o_proj bias, which the decoder does not have")

    rope = source_config.rope_parameters or {}
    nested = [key for key, value in rope.items() if isinstance(value, dict)]
    if nested:
        reject(f"per-layer RoPE parameters ({', '.join(nested)}) are not supported")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        reject(f"RoPE scaling type {rope_type!r} is not supported, only the default RoPE")
    factor = rope.get("partial_rotary_factor", getattr(source_config, "partial_rotary_factor", None))
    if factor not in (None, 1, 1.0):
        reject(f"partial_rotary_factor {factor} is not supported, only 1.0")

    if getattr(source_config, "use_sliding_window", False):
        reject("sliding-window attention (use_sliding_window=True) is not supported")
    layer_types = getattr(source_config, "layer_types", None) or []
    other = sorted({kind for kind in layer_types if kind != "full_attention"})
    if other:
        reject(f"layer types {', '.join(other)} are not supported, only full_attention")


@dataclass(frozen=True)
class TensorHeader:
    """The dtype code (safetensors' F32, BF16, I8 ...) and shape of a stored tensor, and its file."""

    dtype: str
    shape: tuple[int, ...]
    path: Path


def read_source_headers(source: Path) -> dict[str, TensorHeader]:
    """Read the safetensors headers of a checkpoint folder, rejecting tensors that are not floating point.

    Reads no tensor data. Raises ConversionError for an integer, boolean or complex tensor, because the
    decoder would cast a quantized weight to float and silently compute another function.
    """
    headers: dict[str, TensorHeader] = {}
    for path in weight_files(source):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    tensor = handle.get_slice(name)
                    headers[name] = TensorHeader(tensor.get_dtype(), tuple(tensor.get_shape()), path)
        except (SafetensorError, OSError) as error:
            raise StorageError(f"cannot read {path}: {error}; the file is truncated or damaged") from error
    for name, header in headers.items():
        # safetensors codes: F16, BF16, F32, F64 and F8_* are floating point; I*, U*, BOOL, C64 are not.
        if not header.dtype.startswith(("F", "BF")):
            raise ConversionError(
                f"{header.path}: tensor {name} has dtype {header.dtype}, but the source weights must be "
                "floating point (F16, BF16, F32 or F64); integer and quantized checkpoints are not "
                "supported, so convert a floating-point checkpoint of the model"
            )
    return headers


def check_source_layers(source: Path, values: dict[str, Any], headers: dict[str, TensorHeader]) -> None:
    """Raise ConversionError when config.json's num_hidden_layers differs from the layers in the weights."""
    layers = {
        int(parts[2])
        for parts in (name.split(".") for name in headers)
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
    }
    layers_in_weights = max(layers) + 1 if layers else 0
    num_layers = values.get("num_hidden_layers")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConversionError(
            f"{source / CONFIG_NAME} sets num_hidden_layers {num_layers!r}, which is invalid: expected a "
            f"positive integer (the weights hold tensors of {layers_in_weights} layers)"
        )
    if num_layers != layers_in_weights:
        raise ConversionError(
            f"{source / CONFIG_NAME} sets {num_layers:,} layers, but the weights hold tensors of "
            f"{layers_in_weights} layers; the config.json does not belong to these weights"
        )


def check_conversion_memory(config: ModelConfig, source: Path) -> None:
    """Raise ConversionError when converting the model that `config` describes would not fit in memory.

    Counts three float32 copies of the weights: the tensors read from the source, the converted model
    and the transformers reference model, plus the logits of the probe batch.
    """
    try:
        check_inference_memory(
            config, "cpu", PROBE_BATCH * PROBE_LENGTH, str(source), weight_bytes=3 * FP32_BYTES
        )
    except ValueError as error:
        raise ConversionError(str(error)) from error


def check_finite_source_weights(weights: dict[str, torch.Tensor], headers: dict[str, TensorHeader]) -> None:
    """Raise ConversionError naming the first source tensor that contains NaN or infinity, and its file."""
    for name, tensor in weights.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ConversionError(
                f"{headers[name].path}: tensor {name} contains NaN or infinite values; the source "
                "checkpoint is damaged, so download or save it again"
            )


def map_source_weights(state: dict[str, Any], config: ModelConfig, origin: str) -> dict[str, Any]:
    """Return the decoder's base weights from a source state dict, checking names and shapes.

    The values are tensors, or anything with a shape as a tuple (the headers, before any data is read).
    Routers are not in the source and keep their initial values. With tied embeddings the source's
    `lm_head.weight`, if stored, is dropped, as transformers drops it when it ties the weights.
    """
    mapped = {
        name: tensor
        for name, tensor in state.items()
        if not name.endswith(IGNORED_SUFFIXES) and not (config.tie_embeddings and name == "lm_head.weight")
    }
    with torch.device("meta"):
        reference = DecoderLM(config).state_dict()
    expected = {name: tuple(tensor.shape) for name, tensor in reference.items() if "_router." not in name}
    found = {name: tuple(getattr(value, "shape", value)) for name, value in mapped.items()}
    try:
        check_weight_names(config, expected, found, origin)
    except StorageError as error:
        raise ConversionError(str(error)) from error
    return mapped


def probe_input_ids(vocab_size: int, max_length: int) -> torch.Tensor:
    """Return the fixed random token ids (PROBE_BATCH, <= PROBE_LENGTH) on which logits are compared."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    length = min(PROBE_LENGTH, max_length)
    return torch.randint(0, vocab_size, (PROBE_BATCH, length), generator=generator)


@torch.no_grad()
def max_logit_difference(model: DecoderLM, reference: Any, input_ids: torch.Tensor) -> tuple[float, float]:
    """Return the largest |logit difference| between `model` and the transformers `reference` model,
    and the largest |logit| of the reference, on `input_ids`."""
    model.eval()
    reference.eval()
    ours = model(input_ids).float()
    theirs = reference(input_ids=input_ids).logits.float()
    return (ours - theirs).abs().max().item(), theirs.abs().max().item()


def convert_checkpoint(
    source: str | Path,
    scheme: str,
    out_dir: str | Path,
    num_blocks: int | None = None,
    tolerance: float | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Convert the Hugging Face checkpoint folder `source` to `scheme` and write a model folder.

    The converted model's logits are compared with the transformers model of `source` on a probe batch
    in float32. When the largest difference exceeds `tolerance` (default EXACT_TOLERANCE for exact
    schemes, required for replacement schemes), ConversionError is raised and nothing is written.
    """
    source, out_dir = Path(source), check_output_path(out_dir, "--out")
    if scheme not in SCHEMES:
        raise ConversionError(f"unknown scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if scheme == "attnres_cumulative":
        raise ConversionError(
            "attnres_cumulative cannot start from a pretrained model: with zero queries it averages the "
            "running states h_1..h_l instead of reading h_l; use delta_cumulative for cumulative sources"
        )
    if tolerance is None:
        if not is_exact_scheme(scheme):
            raise ConversionError(
                f"scheme {scheme!r} reproduces the source model only up to a larger RMSNorm eps "
                "(x = h / n with n sources); pass --tolerance to accept a measured logit difference"
            )
        tolerance = EXACT_TOLERANCE
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConversionError(
            f"--tolerance {tolerance!r} is invalid: expected a finite non-negative number such as 1e-4"
        )
    _check_out_dir(source, out_dir, overwrite)
    if not source.is_dir():
        raise ConversionError(f"checkpoint folder {source} does not exist or is not a folder")
    if not (source / CONFIG_NAME).is_file():
        raise ConversionError(
            f"{source} is not a Hugging Face checkpoint folder: it has no {CONFIG_NAME}; pass the folder "
            "that save_pretrained wrote"
        )

    values = read_config_json(source)
    model_type = values.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{source / CONFIG_NAME} has model_type {model_type!r}; supported architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    # Checked before transformers reads the config, because Qwen2Config builds a list with one entry per
    # layer (layer_types), which for a damaged layer count fills the memory.
    headers = read_source_headers(source)
    check_source_layers(source, values, headers)

    from transformers import AutoConfig, AutoModelForCausalLM

    source_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    residual = ResidualConfig(
        scheme=scheme,
        num_blocks=num_blocks if num_blocks is not None else ResidualConfig.num_blocks,
        gate=SCHEMES[scheme][1] == "additive",
    )
    config = source_model_config(source_config, residual)
    check_conversion_memory(config, source)
    shapes = {name: header.shape for name, header in headers.items()}
    map_source_weights(shapes, config, str(source))  # names and shapes, before any tensor is read
    weights = map_source_weights(read_weights(source), config, str(source))
    check_finite_source_weights(weights, headers)
    tokenizer = _load_source_tokenizer(source, config, log)

    model = DecoderLM(config)
    model.load_state_dict(weights, strict=False)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.float()

    reference = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, local_files_only=True)
    probe = probe_input_ids(config.vocab_size, config.max_seq_len)
    difference, scale = max_logit_difference(model, reference, probe)
    del reference
    log(
        f"convert: {model_type} -> {scheme}: max |logit difference| {difference:.3g} on a "
        f"{probe.shape[0]}x{probe.shape[1]} probe batch (max |logit| {scale:.3g}, tolerance {tolerance:g})"
    )
    if not difference <= tolerance:
        raise ConversionError(
            f"the converted model's logits differ from the source by {difference:.3g}, more than the "
            f"tolerance {tolerance:g}; nothing was written to {out_dir}"
        )

    save_model_folder(model, out_dir, tokenizer, _generation_config(source))
    log(f"convert: wrote {out_dir}")
    return ConversionResult(config, difference, scale, tolerance, out_dir)


def _check_out_dir(source: Path, out_dir: Path, overwrite: bool) -> None:
    """Raise ConversionError unless writing `out_dir` leaves `source` and every file of the user's intact.

    A non-empty `out_dir` may be replaced only with `overwrite`, and only when it is a model folder that
    train or convert wrote, because replacing deletes everything in it.
    """
    source_path, out_path = source.resolve(), out_dir.resolve()
    if out_path == source_path:
        raise ConversionError(f"--out {out_dir} is the source folder; choose another output folder")
    if out_path in source_path.parents:
        raise ConversionError(
            f"--out {out_dir} contains the source folder {source}; choose an output folder outside it"
        )
    if source_path in out_path.parents:
        raise ConversionError(
            f"--out {out_dir} lies inside the source folder {source}; choose an output folder outside it"
        )
    from .train import RUN_FILE

    # A run's model/ folder looks like any model folder, but run.json, the checkpoint and the results
    # next to it describe the trained weights that replacing it would delete.
    if (out_path.parent / RUN_FILE).is_file():
        raise ConversionError(
            f"--out {out_dir} belongs to the training run at {out_path.parent}, which has a {RUN_FILE}; "
            "convert does not replace a run's model folder, so choose an --out outside the run"
        )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder; choose another output folder")
    problem = model_folder_problem(out_dir)
    if problem is not None:
        label = str(out_dir) if str(out_dir) == str(out_path) else f"{out_dir} ({out_path})"
        raise ConversionError(
            f"--out {label} is not empty and is not a delta-attnres model folder ({problem}); convert "
            "replaces only such folders, even with --overwrite, so choose a new or empty --out"
        )
    if not overwrite and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} already exists; pass --overwrite to replace it")


def _load_source_tokenizer(source: Path, config: ModelConfig, log: Callable[[str], None]) -> Any | None:
    if not ((source / "tokenizer.json").is_file() or (source / "tokenizer_config.json").is_file()):
        log(
            f"convert: {source} has no tokenizer; the converted folder will have none either, so copy the "
            "source model's tokenizer files into it before eval or generate, or pass --tokenizer to "
            "train --init-from"
        )
        return None
    from .data import load_tokenizer

    tokenizer = load_tokenizer(source)
    if len(tokenizer) > config.vocab_size:
        raise ConversionError(
            f"the tokenizer in {source} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}; the tokenizer does not belong to this checkpoint"
        )
    return tokenizer


def _generation_config(source: Path) -> dict[str, Any] | None:
    """Return the source's generation_config.json content, or None to derive it from the tokenizer."""
    path = source / GENERATION_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error})") from error
    values.pop("transformers_version", None)
    return values
