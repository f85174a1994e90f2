"""Training and evaluation of one run: data preparation, the optimisation loop, checkpoints and logs.

A run folder holds:

    run.json          the resolved RunConfig
    metrics.jsonl     one JSON object per logged step and per evaluation
    checkpoint.pt     model, optimizer, scheduler, RNG states and data position (for --resume)
    model/            the final model as a model folder (config.json, model.safetensors, tokenizer)
    result.json       final validation metrics, parameter counts, tokens seen and wall time
    tensorboard/      event files, when the tensorboard package is installed
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__
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
from .model import DecoderLM, is_routing_parameter
from .runconfig import DataConfig, RunConfig, TrainConfig
from .storage import save_model_folder, write_json_atomic

LN2 = math.log(2.0)
RUN_FILE = "run.json"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_DIR = "model"


class RunError(RuntimeError):
    """A run that cannot start or continue; the message names the cause and the fix."""


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
    train_docs, val_docs = split_documents(documents, config.val_fraction, config.split_seed)
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


class MetricsLog:
    """Appends metric dicts to metrics.jsonl and, when available, TensorBoard."""

    def __init__(self, folder: Path, tensorboard: bool = True) -> None:
        self.path = folder / METRICS_FILE
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self.writer = None
            else:
                self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "event") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_train_line(record: dict[str, Any], total_steps: int) -> str:
    return (
        f"step {record['step']:>6}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad {record['grad_norm']:7.3f} | tok/s {record['tokens_per_s']:8.0f} | {record['elapsed_s']:7.1f}s"
    )


def format_eval_line(record: dict[str, Any]) -> str:
    return (
        f"eval {record['step']:>6} | val_loss {record['val_loss']:.4f} | ppl {record['val_perplexity']:9.2f} | "
        f"bpb {record['val_bits_per_byte']:.4f}"
    )


def check_run_folder(out_dir: Path, overwrite: bool, resume: bool) -> None:
    """Reject an output folder that already holds a run unless --overwrite or --resume is given."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"output path {out_dir} exists and is not a folder; choose another --out")
    holds_run = (out_dir / RUN_FILE).exists()
    if resume:
        if not (out_dir / CHECKPOINT_FILE).exists():
            raise RunError(f"--resume: {out_dir} holds no {CHECKPOINT_FILE}; start the run without --resume")
        return
    if holds_run and not overwrite:
        raise RunError(
            f"{out_dir} already holds a run; pass --overwrite to replace it or --resume to continue it"
        )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
    ) as error:  # torch reports a damaged zip as RuntimeError
        raise RunError(f"cannot read checkpoint {path}: {error}; the file is truncated or damaged") from error


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    out_dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_run(
    config: RunConfig,
    out_dir: Path,
    data: PreparedData | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    desc: str | None = None,
) -> RunResult:
    """Train one model as `config` says and write the run folder; return its final metrics."""
    out_dir = Path(out_dir)
    check_run_folder(out_dir, overwrite, resume)
    tc = config.train
    device = resolve_device(tc.device)
    emit = log or (lambda line: tqdm.write(line, file=sys.stdout))

    if data is None:
        data = prepare_data(config.data, config.model.vocab_size, tc.seq_len, log=emit)
    check_split_length(data.train, tc.seq_len, "training")
    check_split_length(data.val, tc.seq_len, "validation")

    if overwrite and not resume:
        for name in (METRICS_FILE, CHECKPOINT_FILE, RESULT_FILE):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    model = DecoderLM(config.model).to(device)
    model.set_gradient_checkpointing(tc.activation_checkpointing)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, tc))
    generator = torch.Generator().manual_seed(tc.seed + 1)
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0

    if resume:
        state = load_checkpoint(out_dir / CHECKPOINT_FILE)
        saved = RunConfig.from_dict(state["config"])
        if saved.model != config.model:
            raise RunError(
                f"--resume: the checkpoint in {out_dir} was trained with scheme {saved.model.residual.scheme!r} "
                f"and a different model config; resume with the run's own settings or start a new --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"], generator)
        start_step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
    else:
        write_json_atomic(out_dir / RUN_FILE, config.to_dict())

    counts = model.parameter_counts()
    emit(
        f"run {desc or config.model.residual.scheme}: delta_attnres {__version__}, torch {torch.__version__}, "
        f"device {device}, params base {counts['base']:,} + routing {counts['routing']:,}"
    )
    forward = torch.compile(model) if tc.compile else model
    metrics = MetricsLog(out_dir)
    micro_batch = tc.batch_size // tc.grad_accum
    tokens_per_step = tc.batch_size * tc.seq_len
    started = time.perf_counter()
    last_eval: dict[str, float] | None = None

    def checkpoint_state(step: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(generator),
            "step": step,
            "tokens_seen": tokens_seen,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
            "config": config.to_dict(),
        }

    bar = tqdm(
        total=tc.steps, initial=start_step, desc=desc, disable=not progress, leave=False, dynamic_ncols=True
    )
    model.train()
    try:
        for step in range(start_step, tc.steps):
            loss_sum = 0.0
            for _ in range(tc.grad_accum):
                inputs, targets = sample_batch(data.train, micro_batch, tc.seq_len, generator)
                inputs, targets = inputs.to(device), targets.to(device)
                with autocast_context(tc.precision, device):
                    logits = forward(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / tc.grad_accum
                loss.backward()
                loss_sum += loss.item()
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, tc.grad_clip if tc.grad_clip > 0 else float("inf")
            )
            if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                if tc.skip_nonfinite:
                    emit(
                        f"step {step}: non-finite loss {loss_sum} or gradient norm {grad_norm.item()}; batch skipped"
                    )
                    metrics.write({"event": "skip", "step": step})
                    scheduler.step()
                    continue
                raise RunError(
                    f"non-finite loss {loss_sum} or gradient norm {grad_norm.item()} at step {step}; the last good "
                    f"checkpoint in {out_dir} is kept. Lower --lr or use --skip-nonfinite"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            tokens_seen += tokens_per_step
            bar.update(1)
            done = step + 1

            if done % tc.log_interval == 0 or done == tc.steps:
                elapsed = elapsed_before + time.perf_counter() - started
                record = {
                    "event": "train",
                    "step": done,
                    "loss": loss_sum,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "tokens": tokens_seen,
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    "elapsed_s": elapsed,
                }
                metrics.write(record)
                emit(format_train_line(record, tc.steps))
            if done % tc.eval_interval == 0 or done == tc.steps:
                last_eval = evaluate(
                    model, data.val, tc.seq_len, tc.eval_batch_size, tc.eval_windows, device, tc.precision
                )
                record = {"event": "eval", "step": done, "tokens": tokens_seen, **last_eval}
                metrics.write(record)
                emit(format_eval_line(record))
            if tc.checkpoint_interval and done % tc.checkpoint_interval == 0 and done < tc.steps:
                save_checkpoint(out_dir / CHECKPOINT_FILE, checkpoint_state(done))
    finally:
        bar.close()
        metrics.close()

    wall_time = elapsed_before + time.perf_counter() - started
    save_checkpoint(out_dir / CHECKPOINT_FILE, checkpoint_state(tc.steps))
    save_model_folder(model, out_dir / MODEL_DIR, data.tokenizer)
    if last_eval is None:  # resumed at the final step
        last_eval = evaluate(
            model, data.val, tc.seq_len, tc.eval_batch_size, tc.eval_windows, device, tc.precision
        )
    result = RunResult(
        scheme=config.model.residual.scheme,
        seed=tc.seed,
        val_loss=last_eval["val_loss"],
        val_perplexity=last_eval["val_perplexity"],
        val_bits_per_byte=last_eval["val_bits_per_byte"],
        params_base=counts["base"],
        params_routing=counts["routing"],
        tokens_seen=tokens_seen,
        wall_time_s=wall_time,
        steps=tc.steps,
        out_dir=str(out_dir),
    )
    write_json_atomic(out_dir / RESULT_FILE, result.to_dict())
    return result


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
