"""Training and evaluation of one run: data preparation, the optimisation loop, checkpoints and logs.

A run folder holds:

    run.json          the resolved RunConfig
    metrics.jsonl     one JSON object per logged step, evaluation and skipped step
    checkpoint.pt     model, optimizer, scheduler, RNG states and data position (for --resume);
                      checkpoint.py describes its content
    checkpoint-step*.dcp/   the sharded model and optimizer state that checkpoint.pt names (FSDP only)
    model/            the final model as a model folder (config.json, model.safetensors, tokenizer)
    result.json       final validation metrics, parameter counts, tokens seen, skipped steps, wall time
    tensorboard/      event files, when the tensorboard package is installed

With several processes (torchrun and --parallel ddp or fsdp), `batch_size` stays the global batch of one
optimizer step: every rank draws the same global batch from the shared data generator and trains on its
own contiguous slice of it, so a run computes the same steps with any number of processes. Only rank 0
logs and writes files; under FSDP every rank also writes its checkpoint shard. Every rank evaluates the
whole validation set, so all ranks hold the same metrics.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from tqdm import tqdm

from . import __version__
from .checkpoint import (
    CHECKPOINT_FILE,
    RESUMABLE_SETTINGS,
    CheckpointError,
    check_resumable,
    check_step_count,
    read_checkpoint,
    recovery_advice,
    remove_stale_shards,
    restore_model_and_optimizer,
    restore_rng,
    rng_state,
    tokenizer_digest,
    write_checkpoint,
    write_failure_message,
)
from .config import ModelConfig
from .data import (
    TokenSplit,
    batch_at,
    check_split_length,
    default_cache_dir,
    eval_windows,
    load_documents,
    load_tokenizer,
    sample_batch,
    split_documents,
    tokenize_documents,
    train_tokenizer,
)
from .distributed import (
    ParallelContext,
    clip_gradients,
    gradient_sync,
    init_parallel,
    model_state,
    parallelize,
)
from .errors import RunError, RunInterrupted
from .metrics import METRICS_FILE, MetricsLog, format_eval_line, format_train_line, truncate_metrics
from .model import DecoderLM, is_routing_parameter
from .runconfig import DataConfig, RunConfig, TrainConfig, init_from_folder, read_checked_weights
from .storage import (
    load_weights,
    read_model_config,
    save_model_folder,
    write_json_atomic,
)

LN2 = math.log(2.0)
RUN_FILE = "run.json"
RESULT_FILE = "result.json"
MODEL_DIR = "model"
# With --skip-nonfinite, this many skipped steps in a row stop the run: the model or the settings are
# broken, not one batch.
MAX_CONSECUTIVE_SKIPS = 10


@dataclass
class PreparedData:
    """Tokenizer and tokenized splits, shared by every run of a comparison."""

    tokenizer: Any
    train: TokenSplit
    val: TokenSplit
    description: str


def prepare_data(
    config: DataConfig, vocab_size: int, seq_len: int, log: Callable[[str], None] = print
) -> PreparedData:
    """Load the text, split it by document, train or load the tokenizer and tokenize both splits."""
    documents = load_documents(
        config.sources or None, text_field=config.text_field, max_documents=config.max_documents
    )
    train_docs, val_docs = split_documents(
        documents, config.val_fraction, config.split_seed, config.max_documents
    )
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        tokenizer = train_tokenizer(train_docs, vocab_size, cache_dir=default_cache_dir() / "tokenizers")
    if len(tokenizer) > vocab_size:
        raise RunError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "raise --vocab-size or use a smaller tokenizer"
        )
    train_split = tokenize_documents(train_docs, tokenizer, "train")
    val_split = tokenize_documents(val_docs, tokenizer, "validation")
    check_split_length(train_split, seq_len, "training")
    check_split_length(val_split, seq_len, "validation")
    description = (
        f"{len(train_docs)} training / {len(val_docs)} validation documents, "
        f"{len(train_split.tokens):,} / {len(val_split.tokens):,} tokens, vocabulary {len(tokenizer)}"
    )
    log(f"data: {description}")
    return PreparedData(tokenizer, train_split, val_split, description)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise RunError(f"invalid --device {name!r}: {error}; use cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return device


def autocast_context(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with three groups: decayed matrices, undecayed norms and biases, and routing parameters.

    Routing parameters (queries, key-norm gains, gates) take `routing_lr` and no weight decay.
    """
    decay, no_decay, routing = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_routing_parameter(name):
            routing.append(param)
        elif param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr, "name": "no_decay"},
        {"params": routing, "weight_decay": 0.0, "lr": config.effective_routing_lr, "name": "routing"},
    ]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, betas=(config.beta1, config.beta2))


def group_peak_lr(group_name: str, config: TrainConfig) -> float:
    """Return the peak learning rate of the build_optimizer group named `group_name`."""
    return config.effective_routing_lr if group_name == "routing" else config.lr


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, config: TrainConfig
) -> None:
    """Set the learning rates, weight decay and betas of `config` on a restored optimizer and scheduler.

    Loading a checkpoint's state dicts brings back the settings the run started with, so a resume
    calls this afterwards to make changed settings take effect. The groups keep build_optimizer's
    split: the routing group takes routing_lr, and only the "decay" group takes weight decay.
    """
    base_lrs: list[float | torch.Tensor] = []
    for group in optimizer.param_groups:
        peak = group_peak_lr(group["name"], config)
        group["initial_lr"] = peak
        group["lr"] = peak * lr_factor(scheduler.last_epoch, config)
        group["weight_decay"] = config.weight_decay if group["name"] == "decay" else 0.0
        group["betas"] = (config.beta1, config.beta2)
        base_lrs.append(peak)
    scheduler.base_lrs = base_lrs
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # read by get_last_lr()


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: TokenSplit,
    seq_len: int,
    batch_size: int,
    max_windows: int | None,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean next-token loss over fixed validation windows, with perplexity and bits per byte.

    Bits per byte uses the split's average bytes per token, so it is exact when every window is used.
    """
    was_training = model.training
    model.eval()
    starts = eval_windows(split, seq_len, max_windows or None)
    total_loss, total_tokens = 0.0, 0
    for first in range(0, len(starts), batch_size):
        inputs, targets = batch_at(split, starts[first : first + batch_size], seq_len)
        with autocast_context(precision, device):
            logits = model(inputs.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
        total_loss += loss.item()
        total_tokens += targets.numel()
    model.train(was_training)
    mean = total_loss / total_tokens
    return {
        "val_loss": mean,
        "val_perplexity": math.exp(min(mean, 700.0)),
        "val_bits_per_byte": mean / LN2 / split.bytes_per_token,
        "val_tokens": float(total_tokens),
    }


def check_run_folder(out_dir: Path, overwrite: bool, resume: bool) -> None:
    """Reject an output folder that already contains a run unless --overwrite or --resume is given.

    --resume needs a checkpoint. A run.json without a checkpoint belongs to a run that stopped before its
    first checkpoint (or whose checkpoint was removed), so only --overwrite can start it again.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"output path {out_dir} exists and is not a folder; choose another --out")
    if resume and overwrite:
        raise RunError(
            "--resume continues the run in --out and --overwrite discards it; pass only one of them"
        )
    holds_run = (out_dir / RUN_FILE).exists()
    has_checkpoint = (out_dir / CHECKPOINT_FILE).exists()
    no_checkpoint = (
        f"contains a {RUN_FILE} but no {CHECKPOINT_FILE}, because the run stopped before its first "
        "checkpoint or the file was removed"
    )
    if resume:
        if has_checkpoint:
            return
        if holds_run:
            raise RunError(f"--resume: {out_dir} {no_checkpoint}; start the run again with --overwrite")
        raise RunError(f"--resume: {out_dir} contains no run to continue; start the run without --resume")
    if holds_run and not overwrite:
        if not has_checkpoint:
            raise RunError(f"{out_dir} {no_checkpoint}; pass --overwrite to start the run again")
        raise RunError(
            f"{out_dir} already holds a run; pass --overwrite to replace it or --resume to continue it"
        )
    # A non-empty folder that is not a run may hold the user's own files, which a run would replace.
    if not holds_run and out_dir.is_dir() and any(out_dir.iterdir()):
        raise RunError(f"output folder {out_dir} is not empty and holds no run; choose an empty or new --out")


def micro_batch_per_rank(config: TrainConfig, world_size: int) -> int:
    """Return the sequences each rank trains on per micro-batch; the global batch must split evenly."""
    micro_batch = config.batch_size // config.grad_accum
    if micro_batch % world_size:
        raise RunError(
            f"batch_size {config.batch_size} with grad_accum {config.grad_accum} gives micro-batches of "
            f"{micro_batch} sequences, which do not split evenly across {world_size} processes; use a "
            f"batch_size divisible by {config.grad_accum * world_size}"
        )
    return micro_batch // world_size


def draw_batch(
    split: TokenSplit, batch_size: int, seq_len: int, generator: torch.Generator, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a global micro-batch of `batch_size` windows and return this rank's contiguous slice of it."""
    inputs, targets = sample_batch(split, batch_size, seq_len, generator)
    local = batch_size // world_size
    rows = slice(rank * local, (rank + 1) * local)
    return inputs[rows], targets[rows]


class StopRequest:
    """Turns the first SIGINT or SIGTERM into a request to stop after the current step.

    The loop then writes a checkpoint and raises RunInterrupted. With `second_signal_stops`, a second
    signal of the same kind acts as without this handler (KeyboardInterrupt, or termination), because
    the first one restores the previous handler. Under torchrun that is off: on Ctrl-C the agent
    forwards the signal to workers that already received it from the terminal, and then waits its
    shutdown timeout (30 s by default in torch 2.13) before SIGKILL, which is the time left to finish
    the step and write the checkpoint. Signal handlers can only be set in the main thread; elsewhere
    this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, second_signal_stops: bool = True) -> None:
        self.signal_number: int | None = None
        self.second_signal_stops = second_signal_stops
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal_number is None:
            self.signal_number = number
        if self.second_signal_stops:
            signal.signal(number, self._previous.pop(number, signal.SIG_DFL))

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


@dataclass
class RunResult:
    scheme: str
    seed: int
    val_loss: float
    val_perplexity: float
    val_bits_per_byte: float
    params_base: int
    params_routing: int
    tokens_seen: int
    wall_time_s: float
    steps: int
    # The run folder as passed to train_run, so a relative path is relative to the working directory of
    # that call. Readers of result.json use the folder they read it from instead.
    out_dir: str
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (--skip-nonfinite)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any, origin: str) -> RunResult:
        """Build a result from the dict of a result.json; raise ValueError naming `origin` and the field."""
        if not isinstance(values, dict):
            raise ValueError(f"{origin} contains {type(values).__name__}, not a JSON object")
        known = {item.name: item for item in fields(cls)}
        missing = [name for name, item in known.items() if name not in values and item.default is MISSING]
        if missing:
            raise ValueError(f"{origin} lacks the field(s) {', '.join(missing)}")
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{origin} has unknown field(s) {', '.join(unknown)}")
        expected_types: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}
        for name, value in values.items():
            allowed = expected_types[str(known[name].type)]
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise ValueError(f"{origin}: field {name} = {value!r} is not of type {known[name].type}")
        return cls(**values)


@dataclass
class Progress:
    """Counters of a run that a checkpoint stores and a resume restores."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    skipped_steps: int = 0


def train_run(
    config: RunConfig,
    out_dir: Path,
    data: PreparedData | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    desc: str | None = None,
    resume_may_change: frozenset[str] = RESUMABLE_SETTINGS,
) -> RunResult:
    """Train one model as `config` says and write the run folder; return its final metrics.

    With `resume`, `config` may differ from the checkpoint's settings only in the settings that
    `resume_may_change` names (see checkpoint.RESUMABLE_SETTINGS), and the data must give the
    checkpoint's tokenizer. run.json is then rewritten with `config`.

    Under torchrun with `config.train.parallel` ddp or fsdp, every rank calls this with the same
    arguments and gets the same result. Raises RunError with a one-line message, and RunInterrupted
    after writing a checkpoint when SIGINT or SIGTERM arrives during training.
    """
    out_dir = Path(out_dir)
    tc = config.train
    context = init_parallel(tc.parallel, resolve_device(tc.device))
    check_run_folder(out_dir, overwrite, resume)
    context.barrier()  # every rank checks the folder before rank 0 changes it
    micro_batch_per_rank(tc, context.world_size)  # raises unless the global batch splits evenly
    emit = main_rank_log(context, log)
    # Read the checkpoint before preparing data, so that a damaged or mismatched one fails fast.
    saved_state = _read_resumable(config, out_dir, resume_may_change) if resume else None

    if data is None:
        data = prepare_data(config.data, config.model.vocab_size, tc.seq_len, log=emit)
    check_split_length(data.train, tc.seq_len, "training")
    check_split_length(data.val, tc.seq_len, "validation")
    tokenizer_id = tokenizer_digest(data.tokenizer)
    if saved_state is not None:
        _check_tokenizer(saved_state, tokenizer_id, data.tokenizer, out_dir)
    # Damaged --init-from weights fail here, before the run folder is created.
    init_weights = None
    if tc.init_from and not resume:
        init_weights = _read_init_weights(tc.init_from, config.model)
    if context.is_main:
        _prepare_folder(out_dir, overwrite and not resume)
    context.barrier()

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    model = DecoderLM(config.model).to(context.device)
    if init_weights is not None:
        init_folder, weights = init_weights
        load_weights(model, weights, str(init_folder))
        del init_weights, weights
    trained = parallelize(model, context, tc.activation_checkpointing, tc.compile, tc.precision)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, tc))
    generator = torch.Generator().manual_seed(tc.seed + 1)
    counters = Progress()

    if saved_state is not None:
        counters = _resume(
            saved_state,
            config,
            out_dir,
            context,
            model,
            optimizer,
            scheduler,
            generator,
            emit,
            resume_may_change,
        )
    if context.is_main:  # on resume, run.json takes the settings that changed
        _write_or_fail(out_dir / RUN_FILE, lambda path: write_json_atomic(path, config.to_dict()))
    context.barrier()

    counts = model.parameter_counts()
    emit(
        f"run {desc or config.model.residual.scheme}: delta_attnres {__version__}, torch {torch.__version__}, "
        f"device {context.device}, {context.world_size} process(es) ({tc.parallel}), "
        f"params base {counts['base']:,} + routing {counts['routing']:,}"
    )
    loop = TrainingLoop(
        config=config,
        out_dir=out_dir,
        context=context,
        model=model,
        trained=trained,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        data=data,
        counters=counters,
        metrics=MetricsLog(
            out_dir, purge_step=counters.step + 1 if resume else None, enabled=context.is_main
        ),
        emit=emit,
        tokenizer_digest=tokenizer_id,
    )
    loop.run(progress, desc)

    counters.step = tc.steps
    wall_time = loop.elapsed()
    loop.checkpoint(tc.steps)
    _save_final_model(model, config.model, context, out_dir / MODEL_DIR, data.tokenizer)
    last_eval = loop.last_eval
    if last_eval is None:  # resumed at the final step, so the loop did not evaluate
        last_eval = _evaluate_run(model, data, tc, context)
    result = RunResult(
        scheme=config.model.residual.scheme,
        seed=tc.seed,
        val_loss=last_eval["val_loss"],
        val_perplexity=last_eval["val_perplexity"],
        val_bits_per_byte=last_eval["val_bits_per_byte"],
        params_base=counts["base"],
        params_routing=counts["routing"],
        tokens_seen=counters.tokens_seen,
        wall_time_s=wall_time,
        steps=tc.steps,
        out_dir=str(out_dir),
        skipped_steps=counters.skipped_steps,
    )
    if counters.skipped_steps:
        emit(f"skipped {counters.skipped_steps} of {tc.steps} steps for a non-finite loss or gradient")
    if context.is_main:
        _write_or_fail(out_dir / RESULT_FILE, lambda path: write_json_atomic(path, result.to_dict()))
    context.barrier()
    return result


@dataclass
class TrainingLoop:
    """The optimisation loop of one run and the objects that every step uses.

    `model` is the plain DecoderLM (sharded in place under FSDP); `trained` is the module the forward
    pass calls, which under DDP is the wrapper around `model`.
    """

    config: RunConfig
    out_dir: Path
    context: ParallelContext
    model: DecoderLM
    trained: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    data: PreparedData
    counters: Progress
    metrics: MetricsLog
    emit: Callable[[str], None]
    tokenizer_digest: str  # stored in each checkpoint, so that a resume can check the tokenizer
    started: float = field(default_factory=time.perf_counter)
    last_eval: dict[str, float] | None = None
    consecutive_skips: int = 0

    def elapsed(self) -> float:
        """Return the training wall time in seconds, including that of earlier, resumed attempts."""
        return self.counters.elapsed_before + time.perf_counter() - self.started

    def run(self, progress: bool, desc: str | None) -> None:
        """Train from the current step to the last; raise RunInterrupted after a checkpoint on a signal."""
        tc = self.config.train
        bar = tqdm(
            total=tc.steps,
            initial=self.counters.step,
            desc=desc,
            disable=not (progress and self.context.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        self.model.train()
        try:
            with StopRequest(second_signal_stops=not self.context.distributed) as stop:
                for step in range(self.counters.step, tc.steps):
                    step_number = step + 1
                    stop_requested = self.step(step_number, stop)
                    bar.update(1)
                    at_interval = tc.checkpoint_interval and step_number % tc.checkpoint_interval == 0
                    if step_number < tc.steps and (at_interval or stop_requested):
                        self.checkpoint(step_number)
                    if stop_requested and step_number < tc.steps:
                        number = stop.signal_number or signal.SIGTERM  # a peer rank may have received it
                        raise RunInterrupted(
                            f"stopped by {signal.Signals(number).name} after step {step_number}; the "
                            f"checkpoint in {self.out_dir} is at that step. Continue with --resume",
                            number,
                        )
        finally:
            bar.close()
            self.metrics.close()

    def step(self, step_number: int, stop: StopRequest) -> bool:
        """Run one optimizer step with its logging and evaluation; return whether any rank must stop."""
        tc = self.config.train
        try:
            loss = self.forward_backward()
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError too
            if not is_out_of_memory(error):
                raise
            raise RunError(out_of_memory_message(tc, step_number, error, self.out_dir)) from error
        loss_total, stop_votes = self.context.sum([loss, float(stop.signal_number is not None)])
        loss = loss_total / self.context.world_size
        grad_norm = clip_gradients(list(self.model.parameters()), tc.grad_clip)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)

        if finite:
            self.optimizer.step()
            self.counters.tokens_seen += tc.batch_size * tc.seq_len
            self.consecutive_skips = 0
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.scheduler.step()
        else:
            # A skipped step still advances the schedule. When no optimizer step came before it, torch
            # warns that the schedule's first value is skipped, which is intended here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()

        if not finite:
            self.counters.skipped_steps += 1
            self.consecutive_skips += 1
            _handle_nonfinite(
                tc,
                step_number,
                loss,
                grad_norm,
                self.consecutive_skips,
                self.out_dir,
                self.metrics,
                self.emit,
            )
        elif step_number % tc.log_interval == 0 or step_number == tc.steps:
            self.log_train(step_number, loss, grad_norm)
        if step_number % tc.eval_interval == 0 or step_number == tc.steps:
            self.last_eval = _evaluate_run(self.model, self.data, tc, self.context)
            record = {
                "event": "eval",
                "step": step_number,
                "tokens": self.counters.tokens_seen,
                **self.last_eval,
            }
            self.metrics.write(record)
            self.emit(format_eval_line(record))
        return stop_votes > 0

    def forward_backward(self) -> float:
        """Accumulate the gradients of one global batch; return this rank's mean loss over its slices."""
        tc, context = self.config.train, self.context
        global_micro_batch = tc.batch_size // tc.grad_accum
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            inputs, targets = draw_batch(
                self.data.train,
                global_micro_batch,
                tc.seq_len,
                self.generator,
                context.rank,
                context.world_size,
            )
            last_micro = micro == tc.grad_accum - 1
            with gradient_sync(self.trained, last_micro), autocast_context(tc.precision, context.device):
                logits = self.trained(inputs.to(context.device))
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(context.device).flatten())
                (loss / tc.grad_accum).backward()
            loss_sum += loss.item() / tc.grad_accum
        return loss_sum

    def log_train(self, step_number: int, loss: float, grad_norm: float) -> None:
        elapsed = self.elapsed()
        record = {
            "event": "train",
            "step": step_number,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": self.counters.tokens_seen,
            "tokens_per_s": self.counters.tokens_seen / max(elapsed, 1e-9),
            "elapsed_s": elapsed,
        }
        self.metrics.write(record)
        self.emit(format_train_line(record, self.config.train.steps))

    def checkpoint(self, step: int) -> None:
        """Write the checkpoint of `step` (a collective under FSDP); raise RunError when it fails."""
        values = {
            "step": step,
            "tokens_seen": self.counters.tokens_seen,
            "elapsed_s": self.elapsed(),
            "skipped_steps": self.counters.skipped_steps,
            "rng": rng_state(self.generator),
            "config": self.config.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tokenizer_digest": self.tokenizer_digest,
        }
        try:
            write_checkpoint(self.out_dir, self.context, self.model, self.optimizer, values)
        except CheckpointError as error:
            raise RunError(str(error)) from error


def _evaluate_run(
    model: torch.nn.Module, data: PreparedData, config: TrainConfig, context: ParallelContext
) -> dict[str, float]:
    # NOTE: every rank evaluates every window (FSDP needs all ranks in each forward pass), so more
    # processes do not make evaluation faster.
    return evaluate(
        model,
        data.val,
        config.seq_len,
        config.eval_batch_size,
        config.eval_windows,
        context.device,
        config.precision,
    )


def main_rank_log(context: ParallelContext, log: Callable[[str], None] | None) -> Callable[[str], None]:
    """Return `log` (default: print above the progress bars) on rank 0, and a no-op on other ranks."""
    if not context.is_main:
        return lambda line: None
    return log or (lambda line: tqdm.write(line, file=sys.stdout))


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    if overwrite:
        for name in (METRICS_FILE, CHECKPOINT_FILE, RESULT_FILE):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
        if out_dir.is_dir():
            remove_stale_shards(out_dir, keep=None)
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_or_fail(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file of the run folder `path.parent`; raise RunError when the write fails."""
    try:
        write(path)
    except OSError as error:
        raise RunError(write_failure_message(str(path), error, path.parent)) from error


def _read_resumable(config: RunConfig, out_dir: Path, may_change: frozenset[str]) -> dict[str, Any]:
    """Read the run's checkpoint and check that it may continue with the requested settings."""
    try:
        state = read_checkpoint(out_dir)
        check_resumable(RunConfig.from_dict(state["config"]), config, out_dir, may_change)
        check_step_count(state["step"], config, out_dir)
    except (CheckpointError, ValueError) as error:
        raise RunError(str(error)) from error
    return state


def _read_init_weights(init_from: str, model_config: ModelConfig) -> tuple[Path, dict[str, torch.Tensor]]:
    """Return the --init-from model folder and its checked CPU weights; its config must equal `model_config`."""
    folder = init_from_folder(init_from)
    config = read_model_config(folder)
    if config != model_config:
        raise RunError(
            f"--init-from {init_from}: the model config of {folder} differs from the model of the run "
            f"(scheme {config.residual.scheme!r} vs {model_config.residual.scheme!r}); build the run config "
            "from the folder with run_config_from_model_folder"
        )
    return folder, read_checked_weights(folder)


def _check_tokenizer(state: dict[str, Any], digest: str, tokenizer: Any, out_dir: Path) -> None:
    """Raise RunError when the data gave another tokenizer than the one the checkpoint was trained with."""
    saved = state.get("tokenizer_digest")
    if saved is not None and saved != digest:
        raise RunError(
            f"--resume: the tokenizer of the requested data (vocabulary {len(tokenizer)}) differs from the "
            f"one the checkpoint in {out_dir} was trained with, so the text or the tokenizer changed; "
            f"resume with the data and tokenizer in {out_dir / RUN_FILE}, choose a new --out, or pass "
            "--overwrite to start again"
        )


def _resume(
    state: dict[str, Any],
    config: RunConfig,
    out_dir: Path,
    context: ParallelContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    generator: torch.Generator,
    emit: Callable[[str], None],
    may_change: frozenset[str],
) -> Progress:
    """Load a checkpoint into the model, optimizer, scheduler and RNGs; return its counters."""
    try:
        restore_model_and_optimizer(state, out_dir, model, optimizer)
    except CheckpointError as error:
        raise RunError(str(error)) from error
    scheduler.load_state_dict(state["scheduler"])
    apply_optimizer_settings(optimizer, scheduler, config.train)
    restore_rng(state["rng"], generator)
    counters = Progress(
        state["step"], state["tokens_seen"], state["elapsed_s"], state.get("skipped_steps", 0)
    )
    context.barrier()  # every rank has read the checkpoint before rank 0 tidies the folder
    if context.is_main:
        remove_stale_shards(out_dir, keep=state.get("shards"))
        dropped = truncate_metrics(out_dir, counters.step)
        emit(
            f"resume: continuing from step {counters.step} (written by {state['world_size']} process(es), "
            f"{state['parallel']}); dropped {dropped} metric record(s) logged after it"
        )
        changes = check_resumable(RunConfig.from_dict(state["config"]), config, out_dir, may_change)
        if changes:
            emit(f"resume: settings changed since the checkpoint: {', '.join(changes)}")
    return counters


def _next_step_after_stop(out_dir: Path) -> tuple[str, str]:
    """Return what a stopped run left behind and how to go on, by whether a checkpoint exists."""
    advice = recovery_advice()
    if (out_dir / CHECKPOINT_FILE).exists():
        return f"the last good checkpoint in {out_dir} is kept", advice.resume
    return "no checkpoint was written yet", advice.restart


def _learning_rates(config: TrainConfig) -> str:
    return f"lr {config.lr:g}, routing lr {config.effective_routing_lr:g}"


def _handle_nonfinite(
    config: TrainConfig,
    step: int,
    loss: float,
    grad_norm: float,
    consecutive: int,
    out_dir: Path,
    metrics: MetricsLog,
    emit: Callable[[str], None],
) -> None:
    """Record a skipped step, or raise RunError when skipping is off or too many steps in a row failed."""
    problem = f"non-finite loss {loss} or gradient norm {grad_norm} at step {step}"
    kept, next_step = _next_step_after_stop(out_dir)
    rates = f"learning rates in use: {_learning_rates(config)}"
    if not config.skip_nonfinite:
        raise RunError(
            f"{problem}; the run stopped and {kept}. Lower --lr or --routing-lr ({rates}) or pass "
            f"--skip-nonfinite, then {next_step}"
        )
    if consecutive >= MAX_CONSECUTIVE_SKIPS:
        raise RunError(
            f"{problem}, the {consecutive}th skipped step in a row; the run stopped and {kept}. "
            f"Lower --lr or --routing-lr ({rates}) or check the data, then {next_step}"
        )
    metrics.write({"event": "skip", "step": step, "loss": loss, "grad_norm": grad_norm})
    emit(f"step {step}: {problem}; the step was skipped")


def is_out_of_memory(error: BaseException) -> bool:
    """Return whether `error` is a failed allocation of torch, on a GPU or in host memory."""
    # torch 2.13 raises OutOfMemoryError for accelerators, but a plain RuntimeError from its CPU allocator.
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(error)


def _memory_error_summary(error: BaseException) -> str:
    """Return the first two sentences of an allocation error's first line, from the allocator's name on."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    if "DefaultCPUAllocator" in line:  # skip the "[enforce fail at alloc_cpu.cpp:N] data." prefix
        line = line[line.index("DefaultCPUAllocator") :]
    return ". ".join(line.split(". ")[:2]).rstrip(".")


def out_of_memory_message(config: TrainConfig, step: int, error: BaseException, out_dir: Path) -> str:
    """Return the one-line message for an allocation that failed in training step `step`."""
    kept, _ = _next_step_after_stop(out_dir)
    if (out_dir / CHECKPOINT_FILE).exists():
        # A resume may change grad_accum but not batch_size or seq_len (checkpoint.RESUMABLE_SETTINGS).
        fix = (
            "raise --grad-accum to split each batch into smaller micro-batches and continue with "
            "--resume, or lower --batch-size or --seq-len and start again with --overwrite"
        )
    else:
        fix = f"lower --batch-size or --seq-len, or raise --grad-accum, then {recovery_advice().restart}"
    return (
        f"out of memory in training step {step} with --batch-size {config.batch_size}, --seq-len "
        f"{config.seq_len} and --grad-accum {config.grad_accum}: {_memory_error_summary(error)}; {kept}. "
        f"To go on, {fix}"
    )


def _save_final_model(
    model: torch.nn.Module, model_config: ModelConfig, context: ParallelContext, folder: Path, tokenizer: Any
) -> None:
    """Write the model folder from rank 0; under FSDP every rank first helps gather the full weights."""
    if context.mode == "fsdp":
        values = model_state(model, full=True)
        if not context.is_main:
            return
        with torch.random.fork_rng(devices=[]):  # building the copy draws initial weights
            plain = DecoderLM(model_config)
        load_weights(plain, values, "the gathered FSDP state")
    elif context.is_main:
        assert isinstance(model, DecoderLM)
        plain = model
    else:
        return
    try:
        save_model_folder(plain, folder, tokenizer)
    except (OSError, SafetensorError) as error:
        raise RunError(write_failure_message(f"model folder {folder}", error, folder.parent)) from error
