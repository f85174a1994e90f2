"""Parallelism applied from outside the model: the process group, compile, DDP and FSDP2.

`parallelize` wraps a plain `DecoderLM` in a fixed order, as torchtitan does: activation checkpointing
(per layer), then `torch.compile`, then data parallelism, which is either DDP or FSDP2 `fully_shard` on
every `DecoderLayer` and then on the root. Under FSDP the compile step comes last (see `parallelize`).
The model itself never imports `torch.distributed`. Every router lives inside its `DecoderLayer` or (the
final router) in the root, so each FSDP unit owns its routing parameters.

Runs with several processes are started by torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT. The backend is nccl on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .model import DecoderLM
from .runconfig import PARALLEL_MODES

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Name segments that wrappers add to parameter names: torch.compile's OptimizedModule, DDP, FSDP1 and
# torch.distributed's checkpoint_wrapper. DecoderLM has no submodule of these names.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# gloo's default is 30 minutes; a rank that waits that long for a crashed peer hides the crash.
GLOO_TIMEOUT = timedelta(minutes=10)

# A FSDP2 unit that returns a view warns once that an in-place op on the view would skip the
# all-gather. Decoder layers return a `Stream` whose tensors are never modified in place (streams are
# immutable, see schemes.py), so the warning does not apply here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class LaunchError(RuntimeError):
    """A process group that cannot be set up as requested; the message names the cause and the fix."""


@dataclass(frozen=True)
class ParallelContext:
    """Rank of this process among `world_size` processes, its parallel mode and its device."""

    mode: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that logs and writes files other than checkpoint shards."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Return the element-wise sum of `values` over all ranks (the values themselves without peers)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()


def torchrun_world_size() -> int:
    """Return WORLD_SIZE as set by torchrun, or 1 outside torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as error:
        raise LaunchError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from error


def init_parallel(mode: str, device: torch.device) -> ParallelContext:
    """Join the process group that torchrun set up (once per process) and pick this rank's device.

    `device` is the device the run asked for; under torchrun a CUDA device without an index becomes
    cuda:LOCAL_RANK. Raises LaunchError when `mode` and the launch do not fit together.
    """
    if mode not in PARALLEL_MODES:
        raise LaunchError(f"--parallel {mode!r} is invalid: expected one of {', '.join(PARALLEL_MODES)}")
    world_size = torchrun_world_size()
    if mode == "none":
        if world_size > 1:
            raise LaunchError(
                f"torchrun started {world_size} processes but --parallel is none, so every process would "
                "train the same model and write the same files; pass --parallel ddp or --parallel fsdp"
            )
        return ParallelContext("none", 0, 1, 0, device)

    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise LaunchError(
            f"--parallel {mode} needs the environment that torchrun sets ({', '.join(missing)} missing); "
            f"start it with `torchrun --nproc_per_node=N -m delta_attnres ...`"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise LaunchError(
                f"the process group already uses {dist.get_backend()}, but device {device} needs {backend}; "
                "use the same --device for every run of this process"
            )
    elif backend == "nccl":
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend, timeout=GLOO_TIMEOUT)
    return ParallelContext(mode, rank, world_size, local_rank, device)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(
    model: DecoderLM,
    context: ParallelContext,
    activation_checkpointing: bool,
    compile_model: bool,
    precision: str,
) -> nn.Module:
    """Apply activation checkpointing, compile and data parallelism to `model`; return the module to call.

    Under FSDP the returned module is `model` itself, sharded in place, so its optimizer must be built
    after this call. Under DDP it is a wrapper around the unchanged `model`.
    """
    model.set_gradient_checkpointing(activation_checkpointing)
    if context.mode == "fsdp":
        policy = MixedPrecisionPolicy()
        # NOTE: this bf16 policy and the nccl backend have not been run; the tests use gloo on CPU.
        if context.device.type == "cuda" and precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        # NOTE: torchtitan compiles each layer before sharding it, but in torch 2.13 a compiled layer
        # under the decoder's checkpoint call fails recomputation (CheckpointError) with FSDP2, so the
        # whole sharded model is compiled instead.
        if compile_model:
            model.compile()
        return model
    if compile_model:
        model.compile()  # in place, so parameter names keep no `_orig_mod.` prefix
    if context.mode == "ddp":
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        # Every parameter takes part in every forward pass (routers exist only where a sublayer routes
        # over at least two sources, or hold a gate), so DDP needs no find_unused_parameters.
        return DistributedDataParallel(model, device_ids=device_ids)
    return model


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward pass only when `enabled` (the last micro-batch)."""
    if isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
        return
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
    yield


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float) -> float:
    """Clip the total gradient norm to `max_norm` (0: no clipping) and return the norm before clipping.

    Under FSDP the gradients are sharded DTensors; the returned norm is that of the full gradient.
    """
    with_grad = [param for param in parameters if param.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm if max_norm > 0 else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm.item())


def model_state(model: nn.Module, full: bool) -> dict[str, Any]:
    """Return the model state dict with plain parameter names; `full` gathers shards onto rank 0's CPU.

    With `full`, every rank must call this (it is a collective under FSDP), and ranks other than 0 get an
    empty dict under FSDP.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=full))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> dict[str, Any]:
    """Return the optimizer state dict keyed by parameter name, so it loads under any wrapping."""
    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_values: dict[str, Any],
    optimizer_values: dict[str, Any],
) -> None:
    """Load full (unsharded) model and optimizer state dicts into a plain, DDP or FSDP model."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_values, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_values, options=options)


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write the model and optimizer state with torch.distributed.checkpoint (DCP), one file per rank.

    Every rank must call this. DCP fsyncs each file it writes; the folder is complete when it returns.
    """
    state = {"model": model_state(model, full=False), "optimizer": optimizer_state(model, optimizer, False)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True, overwrite=True))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load a DCP folder written by `save_sharded` with any number of ranks into `model` and `optimizer`.

    Without a process group this reads the whole state into one process.
    """
    state = {"model": model_state(model, full=False), "optimizer": optimizer_state(model, optimizer, False)}
    with warnings.catch_warnings():
        # DCP warns when it loads without a process group, which is the intended single-process case.
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def strip_wrapper_prefixes(name: str) -> str:
    """Return a parameter name without the segments that compile, DDP and checkpoint wrappers add."""
    return ".".join(segment for segment in name.split(".") if segment not in WRAPPER_SEGMENTS)


def global_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Return the unsharded shape of every tensor in the model's state dict, by plain name."""
    return {strip_wrapper_prefixes(name): tuple(value.shape) for name, value in model.state_dict().items()}
