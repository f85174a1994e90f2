"""Training checkpoints that survive a crash at any moment, and read back with one-line errors.

A run folder contains one checkpoint, `checkpoint.pt`, a dict written with `torch.save`:

    format          CHECKPOINT_FORMAT
    step            optimizer steps done (skipped steps included)
    tokens_seen     training tokens of the applied steps
    elapsed_s       training wall time so far
    skipped_steps   steps skipped for a non-finite loss or gradient
    rng             RNG states of rank 0, and the state of the data generator; every rank draws the same
                    global batch from that generator, so its state is also the position in the data
    config          the RunConfig as a dict
    parallel        none, ddp or fsdp, and world_size: how the checkpoint was written
    scheduler       the LambdaLR state
    tokenizer_digest
                    `tokenizer_digest` of the run's tokenizer (absent in checkpoints of older versions)
    model           full state dict (parallel none and ddp)
    optimizer       full state dict keyed by parameter name (parallel none and ddp)
    shards          instead of model and optimizer (fsdp): a sibling folder written with
                    torch.distributed.checkpoint (DCP), one file per rank
    digest          SHA-256 over every other entry, checked on load, because torch.load does not
                    notice changed bytes inside tensor data

Writing never leaves a broken checkpoint: the new file is written under a temporary name, fsynced and
renamed over `checkpoint.pt`, and the folder is fsynced so that the rename itself survives a power loss.
A DCP folder is complete and renamed into place before the `checkpoint.pt` that names it, and older DCP
folders are removed only after that. A checkpoint written with N ranks loads with any number of ranks
and under any parallel mode, because every state dict is keyed by plain parameter names.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import (
    ParallelContext,
    global_shapes,
    load_full_state,
    load_sharded,
    model_state,
    optimizer_state,
    save_sharded,
    strip_wrapper_prefixes,
)
from .runconfig import RunConfig

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
SHARDS_PREFIX = "checkpoint-step"
SHARDS_SUFFIX = ".dcp"
REQUIRED_KEYS = ("format", "step", "tokens_seen", "elapsed_s", "rng", "config", "scheduler", "digest")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file, the cause and the fix."""


def first_line(error: BaseException) -> str:
    """Return the first sentence of an error message's first line, or the error's type name.

    torch's zip reader, for one, follows its first sentence with several lines of advice.
    """
    for line in str(error).splitlines():
        if line.strip():
            return line.strip().split(". ")[0].rstrip(".")
    return type(error).__name__


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def content_digest(value: Any) -> str:
    """Return a SHA-256 hex digest of nested dicts, lists, tensors and scalars, independent of pickling."""
    digest = hashlib.sha256()
    _update_digest(digest, value)
    return digest.hexdigest()


def _update_digest(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {tensor.dtype} {tuple(value.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}\0".encode())
        for key in sorted(value, key=repr):
            digest.update(f"{key!r}\0".encode())
            _update_digest(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}\0".encode())
        for item in value:
            _update_digest(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r}\0".encode())


def _write_file_atomic(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # A Python file object, unlike a path, makes torch.save keep the OSError of a failed write.
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save wraps a failed write in a RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointError(write_failure_message(f"checkpoint {path}", error, path.parent)) from error
    fsync_folder(path.parent)


@dataclass(frozen=True)
class RecoveryAdvice:
    """The next step that messages give after a run stops, with and without a checkpoint to resume."""

    resume: str
    no_checkpoint: str
    restart: str


TRAIN_ADVICE = RecoveryAdvice(
    resume="continue the run with --resume",
    no_checkpoint="no checkpoint was written yet, so the run cannot be resumed",
    restart="start the run again with --overwrite",
)
_recovery_advice: ContextVar[RecoveryAdvice] = ContextVar("recovery_advice", default=TRAIN_ADVICE)


def recovery_advice() -> RecoveryAdvice:
    """Return the advice in effect: TRAIN_ADVICE unless a caller set other advice with `advise_recovery`."""
    return _recovery_advice.get()


@contextmanager
def advise_recovery(advice: RecoveryAdvice) -> Iterator[None]:
    """Make the messages of runs stopped inside this block give `advice`, for a command that wraps train."""
    token = _recovery_advice.set(advice)
    try:
        yield
    finally:
        _recovery_advice.reset(token)


def write_failure_message(what: str, error: BaseException, out_dir: Path) -> str:
    """Return a one-line message for a failed write of `what` in the run folder `out_dir`.

    The message names a full disk as such, and gives the resume advice of `recovery_advice()` only when
    `out_dir` contains a checkpoint to resume from. A failed checkpoint write leaves the previous file
    in place, so it counts.
    """
    cause = error if isinstance(error, OSError) else error.__context__
    if isinstance(cause, OSError) and cause.strerror:
        reason = f"[Errno {cause.errno}] {cause.strerror}"
    else:
        reason = first_line(error)
    no_space = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    advice = recovery_advice()
    if (out_dir / CHECKPOINT_FILE).exists():
        state, next_step = "the previous checkpoint is kept", advice.resume
    else:
        state, next_step = advice.no_checkpoint, advice.restart
    fix = f"free disk space, then {next_step}" if no_space else next_step
    return f"writing {what} failed: {reason}; {state}. To go on, {fix}"


def write_checkpoint(
    out_dir: Path,
    context: ParallelContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    values: dict[str, Any],
) -> None:
    """Write `values` (step, counters, RNG, config, scheduler) with the model and optimizer state.

    Every rank must call this: under FSDP each rank writes its shard, and otherwise rank 0 writes the
    whole checkpoint. Raises CheckpointError when a write fails; the previous checkpoint stays valid.
    """
    path = out_dir / CHECKPOINT_FILE
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        **values,
        "parallel": context.mode,
        "world_size": context.world_size,
    }
    if context.mode == "fsdp":
        state["shards"] = _write_shards(out_dir, context, model, optimizer, values["step"])
    elif context.is_main:
        state["model"] = model_state(model, full=True)
        state["optimizer"] = optimizer_state(model, optimizer, full=True)
    if context.is_main:
        state["digest"] = content_digest(state)
        _write_file_atomic(path, state)
        remove_stale_shards(out_dir, keep=state.get("shards"))
    context.barrier()


def _write_shards(
    out_dir: Path, context: ParallelContext, model: nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> str:
    """Write a DCP folder for `step` under a temporary name, rename it and return its final name."""
    # A fresh suffix per save, chosen by rank 0, keeps a re-save of the same step from touching the
    # folder that the current checkpoint.pt names.
    names = [f"{SHARDS_PREFIX}{step:08d}-{uuid.uuid4().hex[:8]}{SHARDS_SUFFIX}"]
    dist.broadcast_object_list(names, src=0)
    name = names[0]
    tmp = out_dir / f".{name}.tmp"
    try:
        save_sharded(model, optimizer, tmp)
    except (OSError, RuntimeError) as error:
        raise CheckpointError(write_failure_message(f"checkpoint shards {tmp}", error, out_dir)) from error
    context.barrier()
    if context.is_main:
        os.replace(tmp, out_dir / name)
        fsync_folder(out_dir)
    return name


def remove_stale_shards(out_dir: Path, keep: str | None) -> None:
    """Delete DCP folders and temporary checkpoint files that the current checkpoint does not name."""
    for entry in out_dir.iterdir():
        name = entry.name
        is_shards = name.startswith(SHARDS_PREFIX) and name.endswith(SHARDS_SUFFIX) and name != keep
        is_temporary = name.startswith((f".{SHARDS_PREFIX}", f".{CHECKPOINT_FILE}")) and name.endswith(".tmp")
        if is_shards or is_temporary:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def read_checkpoint(out_dir: Path) -> dict[str, Any]:
    """Read and verify `checkpoint.pt` of a run folder; raise CheckpointError naming the problem."""
    path = out_dir / CHECKPOINT_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} not found; start the run without --resume") from error
    except EOFError as error:
        raise CheckpointError(
            f"checkpoint {path} is empty or truncated; start the run again with --overwrite"
        ) from error
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as error:
        # A damaged zip reads as RuntimeError, damaged pickle data as UnpicklingError or ValueError.
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first_line(error)}; the file is truncated or damaged. "
            "Start the run again with --overwrite"
        ) from error
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path} is not a training checkpoint of this version of delta_attnres (format "
            f"{CHECKPOINT_FORMAT}); start the run again with --overwrite"
        )
    stored = state.pop("digest")
    if content_digest(state) != stored:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its content does not match the digest stored with it. "
            "Start the run again with --overwrite"
        )
    if "shards" in state and not (out_dir / state["shards"]).is_dir():
        raise CheckpointError(
            f"checkpoint {path} names the sharded state {state['shards']}, which is missing from {out_dir}; "
            "start the run again with --overwrite"
        )
    return state


def restore_model_and_optimizer(
    state: dict[str, Any], out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load the model and optimizer state of a checkpoint read by `read_checkpoint`.

    `model` may be plain, compiled, DDP-wrapped or sharded with FSDP, whatever wrote the checkpoint.
    """
    origin = str(out_dir / CHECKPOINT_FILE)
    if "shards" in state:
        folder = out_dir / state["shards"]
        try:
            load_sharded(model, optimizer, folder)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"cannot load the sharded checkpoint {folder}: {first_line(error)}; the folder is damaged "
                "or belongs to another model"
            ) from error
        return
    model_values = {strip_wrapper_prefixes(name): value for name, value in state["model"].items()}
    check_tensor_names(global_shapes(model), model_values, origin)
    optimizer_values = dict(state["optimizer"])
    optimizer_values["state"] = {
        strip_wrapper_prefixes(name): value for name, value in optimizer_values["state"].items()
    }
    optimizer_values["param_groups"] = [
        {**group, "params": [strip_wrapper_prefixes(name) for name in group["params"]]}
        for group in optimizer_values["param_groups"]
    ]
    try:
        load_full_state(model, optimizer, model_values, optimizer_values)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"cannot load the optimizer state of {origin}: {first_line(error)}; the checkpoint belongs to "
            "another model or optimizer setup"
        ) from error


def check_tensor_names(
    expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor], origin: str
) -> None:
    """Raise CheckpointError for missing, unexpected or mis-shaped tensors, naming the first few."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{origin} does not match the model: missing {missing[:5] or 'none'}, "
            f"unexpected {unexpected[:5] or 'none'}"
        )
    for name, tensor in found.items():
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{origin}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {expected[name]}"
            )


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Return the torch, CUDA and Python RNG states of this process and the data generator's state."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore the RNG states that `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    random.setstate((3, tuple(state["python"]), None))  # version 3 is CPython's Mersenne Twister state
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat_fields(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe_differences(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Return 'name saved -> requested' for every field that differs between two config dicts."""
    old, new = _flat_fields(saved), _flat_fields(requested)
    return [
        f"{name} {old.get(name)!r} -> {new.get(name)!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]


# Settings, named as in run.json, that set where and how a run executes but not what it computes.
# A comparison reuses a finished or checkpointed run when only these differ. grad_accum splits the same
# global batch into micro-batches (the CPU data generator draws the same windows in one call or in
# several, as checked with torch 2.13), so it changes the gradient only by rounding.
EXECUTION_SETTINGS = frozenset(
    {
        "train.device",
        "train.parallel",
        "train.compile",
        "train.activation_checkpointing",
        "train.checkpoint_interval",
        "train.log_interval",
        "train.eval_batch_size",
        "train.grad_accum",
        "train.skip_nonfinite",
    }
)
# Settings that `train --resume` may change as well: the length of the run (steps may grow, see
# check_step_count), the optimizer and its schedule, the precision and the evaluation. All others (the
# model, the data and tokenizer, batch_size, seq_len, seed, init_from) fix what the saved weights and
# the saved position in the data mean, so a resume must keep them.
RESUMABLE_SETTINGS = EXECUTION_SETTINGS | frozenset(
    {
        "preset",
        "train.steps",
        "train.lr",
        "train.routing_lr",
        "train.min_lr_ratio",
        "train.warmup_steps",
        "train.weight_decay",
        "train.beta1",
        "train.beta2",
        "train.grad_clip",
        "train.precision",
        "train.eval_interval",
        "train.eval_windows",
    }
)
# Settings that hold paths: the same path written another way (relative or absolute) is no change.
PATH_SETTINGS = frozenset({"data.sources", "data.tokenizer", "train.init_from"})


def _same_path(saved: Any, requested: Any) -> bool:
    if saved == requested:
        return True
    if not (isinstance(saved, str) and isinstance(requested, str)):
        return False
    # NOTE: a relative path is resolved against the current working directory, which need not be the one
    # the run started in. Equal strings count as the same path even when they name other files there.
    # A resume then notices the change only when the other text gives another tokenizer.
    return Path(saved).expanduser().resolve() == Path(requested).expanduser().resolve()


def _same_setting(name: str, saved: Any, requested: Any) -> bool:
    if saved == requested:
        return True
    if name not in PATH_SETTINGS:
        return False
    if isinstance(saved, list) and isinstance(requested, list):
        return len(saved) == len(requested) and all(map(_same_path, saved, requested))
    return _same_path(saved, requested)


def classify_changes(
    saved: RunConfig, requested: RunConfig, may_change: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Compare two run configs setting by setting; return (forbidden, allowed) 'name saved -> requested' lines.

    A changed setting is allowed when its run.json name, such as "train.steps", is in `may_change`.
    """
    old, new = _flat_fields(saved.to_dict()), _flat_fields(requested.to_dict())
    forbidden: list[str] = []
    allowed: list[str] = []
    for name in sorted(set(old) | set(new)):
        if _same_setting(name, old.get(name), new.get(name)):
            continue
        line = f"{name} {old.get(name)!r} -> {new.get(name)!r}"
        (allowed if name in may_change else forbidden).append(line)
    return forbidden, allowed


def list_changes(changes: list[str], limit: int = 4) -> str:
    """Join the first `limit` change lines with commas and count the rest."""
    text = ", ".join(changes[:limit])
    if len(changes) > limit:
        text += f" and {len(changes) - limit} more"
    return text


def check_resumable(
    saved: RunConfig,
    requested: RunConfig,
    out_dir: Path,
    may_change: frozenset[str] = RESUMABLE_SETTINGS,
) -> list[str]:
    """Raise CheckpointError unless the checkpoint's settings may turn into the requested ones.

    Returns the allowed changes, for a notice. `may_change` is RESUMABLE_SETTINGS for `train --resume`;
    `compare` passes EXECUTION_SETTINGS, so that every run of a comparison trains with the same settings.
    """
    if saved.model != requested.model:
        changes = describe_differences(saved.model.to_dict(), requested.model.to_dict())
        raise CheckpointError(
            f"--resume: the checkpoint in {out_dir} contains another model (checkpoint -> requested: "
            f"{', '.join(changes[:4])}); resume with the run's own settings (see run.json) or choose a new --out"
        )
    forbidden, allowed = classify_changes(saved, requested, may_change)
    if forbidden:
        raise CheckpointError(
            f"--resume: the run in {out_dir} was trained with other settings, which a resume cannot change "
            f"(checkpoint -> requested: {list_changes(forbidden)}); resume with the settings in "
            f"{out_dir / 'run.json'}, choose a new --out, or pass --overwrite to start again"
        )
    return allowed


def check_step_count(checkpoint_step: int, requested: RunConfig, out_dir: Path) -> None:
    """Raise CheckpointError when the checkpoint is already past the requested number of steps."""
    if checkpoint_step > requested.train.steps:
        raise CheckpointError(
            f"--resume: the checkpoint in {out_dir} is at step {checkpoint_step}, past the requested "
            f"--steps {requested.train.steps}; pass --steps {checkpoint_step} or more, or start again "
            "with --overwrite"
        )


def tokenizer_digest(tokenizer: Any) -> str:
    """Return a SHA-256 hex digest of a tokenizer's vocabulary: every token with its id."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256()
    for token, index in vocabulary:
        digest.update(f"{index}\0{token}\0".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()
