"""The metric records of a run: metrics.jsonl, TensorBoard events and the printed log lines.

Every record is one JSON object with an `event` ("train", "eval" or "skip") and the optimizer `step` it
belongs to, counted from 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import write_failure_message
from .errors import RunError
from .storage import write_text_atomic

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends metric dicts to metrics.jsonl and, when available, TensorBoard; a no-op unless `enabled`.

    `purge_step` (on resume) drops the TensorBoard events from that step on, which the interrupted run
    wrote after its last checkpoint.
    """

    def __init__(
        self, folder: Path, tensorboard: bool = True, purge_step: int | None = None, enabled: bool = True
    ) -> None:
        self.path = folder / METRICS_FILE
        self.enabled = enabled
        self.writer: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self.writer = None
            else:
                self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            raise RunError(write_failure_message(str(self.path), error, self.path.parent)) from error
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "event") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(out_dir: Path, step: int) -> int:
    """Keep only the metric records up to `step` (the checkpoint's) and return how many were dropped.

    A run killed after its last checkpoint has logged steps that the resumed run logs again. The kill
    may also have cut the last line short, or a damaged disk may have left bytes that are not UTF-8.
    All these lines are removed, and the file is replaced atomically.
    """
    path = out_dir / METRICS_FILE
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for raw_line in _read_metrics_file(path).splitlines():
        try:
            line = raw_line.decode("utf-8")
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def _read_metrics_file(path: Path) -> bytes:
    """Return the bytes of a metrics.jsonl, or raise RunError when it is a folder or cannot be read."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise RunError(
            f"cannot read {path}: {error.strerror or error}; it must be the run's metrics file, so move it "
            "away (the run then keeps no records of earlier steps) or restore the file, and try again"
        ) from error


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


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """Return the records of a run's metrics.jsonl; raise RunError naming the file and line of a bad one."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for number, raw_line in enumerate(_read_metrics_file(path).splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            record = json.loads(raw_line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"is not valid UTF-8 JSON ({error})"
        else:
            if isinstance(record, dict) and "event" in record:
                records.append(record)
                continue
            problem = "is not a metric record (a JSON object with an event)"
        raise RunError(
            f"line {number} of {path} {problem}; delete that line, or train the run again with --overwrite"
        )
    return records
