"""Runs that meet faults and bad input: non-finite losses, damaged files, full disks and interrupts.

Each case must end with a one-line error (or a clean stop) and leave every valid file on disk intact.
docs/robustness.md lists these cases with their outcomes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from run_helpers import (
    FullDiskFile,
    read_records,
    start_paused_cli,
    subprocess_env,
    tiny_config,
    write_corpus,
)

from delta_attnres import checkpoint as checkpoint_module
from delta_attnres import metrics as metrics_module
from delta_attnres import train
from delta_attnres.checkpoint import CHECKPOINT_FILE, content_digest, read_checkpoint
from delta_attnres.cli import main
from delta_attnres.distributed import LaunchError, init_parallel
from delta_attnres.model import DecoderLM
from delta_attnres.train import MAX_CONSECUTIVE_SKIPS, RunError, micro_batch_per_rank, train_run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "tokenizer-cache"
    monkeypatch.setenv("DELTA_ATTNRES_CACHE", str(cache))
    return cache


def _train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--preset", "tiny",
        "--scheme", "delta_block",
        "--num-blocks", "2",
        "--data", str(corpus),
        "--steps", "4",
        "--batch-size", "4",
        "--seq-len", "32",
        "--log-interval", "1",
        "--eval-windows", "4",
        "--checkpoint-interval", "2",
        "--device", "cpu",
        "--no-progress",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture()
def finished_run(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A finished 4-step delta_block run with its checkpoint."""
    out = tmp_path / "run"
    code, _, stderr = _run_cli(_train_args(corpus, out), capsys)
    assert code == 0, stderr
    return out


# --- Non-finite loss ----------------------------------------------------------------------------------


def _nan_model_at(calls: set[int] | None) -> type[DecoderLM]:
    """Return a DecoderLM subclass whose training forward pass returns NaN logits at the given calls.

    `calls` counts training forward passes from 1 (one per step without gradient accumulation);
    None makes every training forward pass return NaN.
    """

    class NaNDecoderLM(DecoderLM):
        training_calls = 0

        def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            logits = super().forward(input_ids, **kwargs)
            if not self.training:
                return logits
            NaNDecoderLM.training_calls += 1
            if calls is None or NaNDecoderLM.training_calls in calls:
                return logits * float("nan")
            return logits

    return NaNDecoderLM


def test_nonfinite_loss_stops_and_keeps_checkpoint(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(corpus, steps=6, checkpoint_interval=2)
    monkeypatch.setattr(train, "DecoderLM", _nan_model_at({5}))
    with pytest.raises(RunError) as raised:
        train_run(config, tmp_path, progress=False, log=lambda line: None)
    message = str(raised.value)
    assert "non-finite loss nan" in message
    assert "at step 5" in message
    assert "last good checkpoint" in message
    assert "\n" not in message
    assert read_checkpoint(tmp_path)["step"] == 4
    assert [record["step"] for record in read_records(tmp_path)] == [1, 2, 3, 4]
    assert not (tmp_path / "result.json").exists()

    monkeypatch.undo()
    result = train_run(config, tmp_path, resume=True, progress=False, log=lambda line: None)
    assert result.skipped_steps == 0
    assert [record["step"] for record in read_records(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_skip_nonfinite_counts_skipped_steps(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(corpus, steps=5, skip_nonfinite=True)
    monkeypatch.setattr(train, "DecoderLM", _nan_model_at({2, 4}))
    lines: list[str] = []
    result = train_run(config, tmp_path, progress=False, log=lines.append)
    assert result.skipped_steps == 2
    assert json.loads((tmp_path / "result.json").read_text())["skipped_steps"] == 2
    assert result.tokens_seen == 3 * config.train.batch_size * config.train.seq_len
    assert [record["step"] for record in read_records(tmp_path, "skip")] == [2, 4]
    assert [record["step"] for record in read_records(tmp_path)] == [1, 3, 5]
    assert any("skipped 2 of 5 steps" in line for line in lines)
    assert torch.isfinite(torch.tensor(result.val_loss))


def test_consecutive_skips_stop_run(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(corpus, steps=MAX_CONSECUTIVE_SKIPS + 2, skip_nonfinite=True)
    monkeypatch.setattr(train, "DecoderLM", _nan_model_at(None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RunError, match=f"the {MAX_CONSECUTIVE_SKIPS}th skipped step in a row"):
            train_run(config, tmp_path, progress=False, log=lambda line: None)

    # Every step was skipped, so the scheduler never followed an optimizer step; torch's warning about
    # that order is expected and must not reach the user.
    scheduler_warnings = [str(w.message) for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert scheduler_warnings == []


def test_absurd_learning_rate_stops_run(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, _, stderr = _run_cli(_train_args(corpus, out, "--lr", "1e30", "--checkpoint-interval", "1"), capsys)
    assert code == 2
    line = _one_line_error(stderr)
    assert "non-finite loss" in line
    assert "at step 2" in line
    assert read_checkpoint(out)["step"] == 1


# --- Damaged or mismatched checkpoints -----------------------------------------------------------------


def _resume_error(finished_run: Path, corpus: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code, _, stderr = _run_cli(_train_args(corpus, finished_run, "--steps", "6", "--resume", *extra), capsys)
    assert code == 2
    return _one_line_error(stderr)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "empty", "flip-middle", "flip-start", "flip-end", "not-a-checkpoint"],
)
def test_damaged_checkpoint_gives_one_line_error(
    damage: str, finished_run: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = finished_run / CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "not-a-checkpoint":
        buffer = io.BytesIO()
        torch.save({"weights": torch.zeros(3)}, buffer)
        data = bytearray(buffer.getvalue())
    else:
        start = {"flip-middle": len(data) // 2, "flip-start": 100, "flip-end": len(data) - 200}[damage]
        for index in range(start, start + 16):
            data[index] ^= 0xFF
    path.write_bytes(bytes(data))

    line = _resume_error(finished_run, corpus, capsys)
    assert str(path) in line
    expected = ("truncated or damaged", "is damaged", "is empty or truncated", "not a training checkpoint")
    assert any(phrase in line for phrase in expected), line
    assert path.read_bytes() == bytes(data)  # the failed resume leaves the file for inspection


def test_resume_with_other_scheme_is_rejected(
    finished_run: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (finished_run / CHECKPOINT_FILE).read_bytes()
    line = _resume_error(finished_run, corpus, capsys, "--scheme", "delta")
    assert "residual.scheme 'delta_block' -> 'delta'" in line
    line = _resume_error(finished_run, corpus, capsys, "--hidden-size", "32")
    assert "hidden_size 64 -> 32" in line
    assert (finished_run / CHECKPOINT_FILE).read_bytes() == before


def test_checkpoint_with_wrong_tensor_shape_is_rejected(
    finished_run: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = finished_run / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    state.pop("digest")
    state["model"]["model.norm.weight"] = torch.ones(32)
    state["digest"] = content_digest(state)
    torch.save(state, path)
    line = _resume_error(finished_run, corpus, capsys)
    assert "tensor model.norm.weight has shape (32,), the model expects (64,)" in line


def test_missing_shard_folder_is_reported(finished_run: Path) -> None:
    path = finished_run / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    state.pop("digest")
    state["shards"] = "checkpoint-step00000004-gone.dcp"
    state["digest"] = content_digest(state)
    torch.save(state, path)
    with pytest.raises(checkpoint_module.CheckpointError, match="which is missing from"):
        read_checkpoint(finished_run)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_safetensors_gives_one_line_error(
    damage: str, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = finished_run / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[8:40] = b"\xff" * 32  # inside the JSON header that follows the 8-byte length
    weights.write_bytes(bytes(data))
    code, _, stderr = _run_cli(["eval", "--model", str(finished_run), "--max-windows", "2"], capsys)
    assert code == 2
    line = _one_line_error(stderr)
    assert str(weights) in line


# --- Full disk ------------------------------------------------------------------------------------------


def test_full_disk_during_checkpoint_keeps_previous(
    finished_run: Path, corpus: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = finished_run / CHECKPOINT_FILE
    before = path.read_bytes()
    monkeypatch.setattr(
        checkpoint_module, "open", lambda file, mode: FullDiskFile(file, mode, 100_000), raising=False
    )
    line = _resume_error(finished_run, corpus, capsys)
    assert f"writing checkpoint {path} failed: [Errno {errno.ENOSPC}] No space left on device" in line
    assert "the previous checkpoint is kept" in line
    assert "free disk space" in line
    assert path.read_bytes() == before
    assert not list(finished_run.glob(".*.tmp"))

    monkeypatch.undo()
    code, _, stderr = _run_cli(_train_args(corpus, finished_run, "--steps", "6", "--resume"), capsys)
    assert code == 0, stderr
    assert read_checkpoint(finished_run)["step"] == 6


def test_full_disk_during_model_folder_save_keeps_checkpoint(
    finished_run: Path, corpus: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_with_full_disk(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "save_model_folder", fail_with_full_disk)
    line = _resume_error(finished_run, corpus, capsys)
    assert "writing model folder" in line
    assert "No space left on device" in line
    assert read_checkpoint(finished_run)["step"] == 6  # written before the model folder
    assert (finished_run / "model" / "model.safetensors").exists()  # the folder of step 4 is kept

    monkeypatch.undo()
    code, _, stderr = _run_cli(_train_args(corpus, finished_run, "--steps", "6", "--resume"), capsys)
    assert code == 0, stderr
    assert json.loads((finished_run / "result.json").read_text())["steps"] == 6


def test_full_disk_during_metrics_write_stops_run(
    finished_run: Path, corpus: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (finished_run / CHECKPOINT_FILE).read_bytes()

    class FullDiskTextFile(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_module, "open", lambda *args, **kwargs: FullDiskTextFile(), raising=False)
    line = _resume_error(finished_run, corpus, capsys)
    assert "metrics.jsonl failed: [Errno 28] No space left on device" in line
    assert (finished_run / CHECKPOINT_FILE).read_bytes() == before


# A child that trains with a file size limit (RLIMIT_FSIZE) above every file of the run but the
# checkpoint, so the kernel itself fails the checkpoint write with EFBIG.
SIZE_LIMITED_CLI = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from delta_attnres.cli import main
sys.exit(main(json.loads(sys.argv[2])))
"""


def test_file_size_limit_during_checkpoint_keeps_previous(
    finished_run: Path, corpus: Path, tokenizer_cache: Path
) -> None:
    path = finished_run / CHECKPOINT_FILE
    before = path.read_bytes()
    weights_size = (finished_run / "model" / "model.safetensors").stat().st_size
    limit = (weights_size + len(before)) // 2
    assert weights_size < limit < len(before)
    args = _train_args(corpus, finished_run, "--steps", "6", "--resume")
    finished = subprocess.run(
        [sys.executable, "-c", SIZE_LIMITED_CLI, str(limit), json.dumps(args)],
        capture_output=True,
        text=True,
        env=subprocess_env(tokenizer_cache),
        timeout=300,
    )
    assert finished.returncode == 2, finished.stderr
    line = _one_line_error(finished.stderr)
    assert f"[Errno {errno.EFBIG}] File too large" in line
    assert "the previous checkpoint is kept" in line
    assert path.read_bytes() == before
    assert not list(finished_run.glob(".*.tmp"))


# --- Interrupts -----------------------------------------------------------------------------------------


def _compare_args(corpus: Path, out: Path) -> list[str]:
    return [
        "compare",
        "--preset", "tiny",
        "--schemes", "standard,delta",
        "--data", str(corpus),
        "--steps", "6",
        "--batch-size", "4",
        "--seq-len", "32",
        "--eval-interval", "3",
        "--eval-windows", "4",
        "--log-interval", "1",
        "--device", "cpu",
        "--no-progress",
        "--out", str(out),
    ]  # fmt: skip


def test_compare_resumes_after_ctrl_c(
    tmp_path: Path, corpus: Path, tokenizer_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    # The first run (standard) draws 6 batches; pause in step 3 of the second run (delta).
    release = tmp_path / "release"
    process = start_paused_cli(_compare_args(corpus, interrupted), 6 + 3, tokenizer_cache, release)
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal
    release.touch()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "stopped by SIGINT after step 3" in stderr
    assert (interrupted / "runs" / "standard-seed0" / "result.json").exists()
    assert read_checkpoint(interrupted / "runs" / "delta-seed0")["step"] == 3
    assert not (interrupted / "report.json").exists()

    code, stdout, stderr = _run_cli([*_compare_args(corpus, interrupted), "--resume"], capsys)
    assert code == 0, stderr
    assert "standard seed 0: finished earlier" in stdout
    assert "resume: continuing from step 3" in stdout
    code, _, stderr = _run_cli(_compare_args(corpus, straight), capsys)
    assert code == 0, stderr

    for scheme in ("standard", "delta"):
        got = read_records(interrupted / "runs" / f"{scheme}-seed0")
        want = read_records(straight / "runs" / f"{scheme}-seed0")
        assert [record["step"] for record in got] == [1, 2, 3, 4, 5, 6]
        for have, expected in zip(got, want, strict=True):
            assert have["loss"] == pytest.approx(expected["loss"], abs=1e-6), (scheme, have["step"])
    report = json.loads((interrupted / "report.json").read_text())
    reference = json.loads((straight / "report.json").read_text())
    for scheme in ("standard", "delta"):
        assert report["schemes"][scheme]["val_loss"] == pytest.approx(
            reference["schemes"][scheme]["val_loss"], abs=1e-6
        )


def test_sigterm_stops_train_after_checkpoint(
    tmp_path: Path, corpus: Path, tokenizer_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = _train_args(corpus, out, "--checkpoint-interval", "0")
    release = tmp_path / "release"
    process = start_paused_cli(args, 2, tokenizer_cache, release)
    process.send_signal(signal.SIGTERM)
    release.touch()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM after step 2" in stderr
    assert read_checkpoint(out)["step"] == 2
    code, _, stderr = _run_cli([*args, "--resume"], capsys)
    assert code == 0, stderr
    assert [record["step"] for record in read_records(out)] == [1, 2, 3, 4]


def test_ctrl_c_under_torchrun_writes_checkpoint(
    tmp_path: Path, corpus: Path, tokenizer_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C reaches torchrun's agent and both workers; the agent then forwards SIGINT to the workers
    # again, which must not cut the step short.
    out = tmp_path / "run"
    args = _train_args(corpus, out, "--checkpoint-interval", "0", "--parallel", "fsdp")
    release = tmp_path / "release"
    process = start_paused_cli(args, 3, tokenizer_cache, release, processes=2)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(1.0)  # let the agent forward its SIGINT while the workers still wait in step 3
    release.touch()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    for rank in (0, 1):
        assert f"train (rank {rank}): stopped by SIGINT after step 3" in stderr, stderr[-3000:]
    state = read_checkpoint(out)
    assert state["step"] == 3
    assert state["parallel"] == "fsdp"

    resume = [arg for arg in args if arg not in ("--parallel", "fsdp")]
    code, _, stderr = _run_cli([*resume, "--resume"], capsys)
    assert code == 0, stderr
    assert [record["step"] for record in read_records(out)] == [1, 2, 3, 4]


# --- Launch settings ------------------------------------------------------------------------------------


def test_parallel_none_under_torchrun_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="pass --parallel ddp or --parallel fsdp"):
        init_parallel("none", torch.device("cpu"))


def test_batch_must_split_across_processes(corpus: Path) -> None:
    config = tiny_config(corpus, batch_size=6, grad_accum=2)
    assert micro_batch_per_rank(config.train, 1) == 3
    with pytest.raises(
        RunError, match="do not split evenly across 2 processes; use a batch_size divisible by 4"
    ):
        micro_batch_per_rank(config.train, 2)
