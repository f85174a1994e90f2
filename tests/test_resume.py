"""Checkpoints and --resume: a killed run continues exactly, and no checkpoint write leaves a broken file."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from run_helpers import read_records, start_paused_cli, tiny_config, write_corpus

from delta_attnres import checkpoint as checkpoint_module
from delta_attnres.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    content_digest,
    read_checkpoint,
    restore_model_and_optimizer,
)
from delta_attnres.distributed import strip_wrapper_prefixes
from delta_attnres.metrics import truncate_metrics
from delta_attnres.model import DecoderLM
from delta_attnres.train import RunError, build_optimizer, train_run

STEPS_BEFORE_CHECKPOINT = 4  # N: the checkpoint interval; the straight run trains 2N steps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "tokenizer-cache"
    monkeypatch.setenv("DELTA_ATTNRES_CACHE", str(cache))
    return cache


def _cli_args(corpus: Path, out: Path, steps: int, checkpoint_interval: int) -> list[str]:
    return [
        "train",
        "--preset", "tiny",
        "--scheme", "delta_block",
        "--num-blocks", "2",
        "--data", str(corpus),
        "--steps", str(steps),
        "--batch-size", "4",
        "--seq-len", "32",
        "--warmup-steps", "2",
        "--log-interval", "1",
        "--eval-interval", "3",
        "--eval-windows", "4",
        "--checkpoint-interval", str(checkpoint_interval),
        "--device", "cpu",
        "--no-progress",
        "--out", str(out),
    ]  # fmt: skip


def test_resume_after_kill_matches_straight_run(
    tmp_path: Path, corpus: Path, tokenizer_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from delta_attnres.cli import main

    n = STEPS_BEFORE_CHECKPOINT
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_cli_args(corpus, straight, 2 * n, n)) == 0

    # Kill -9 during step N + 3: the checkpoint is at step N, and metrics.jsonl already logs N+1, N+2.
    release = tmp_path / "release"  # never created: the child waits until it is killed
    process = start_paused_cli(_cli_args(corpus, killed, 2 * n, n), n + 3, tokenizer_cache, release)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert read_checkpoint(killed)["step"] == n
    assert [r["step"] for r in read_records(killed)] == list(range(1, n + 3))
    assert not (killed / "result.json").exists()

    assert main([*_cli_args(corpus, killed, 2 * n, n), "--resume"]) == 0
    assert f"resume: continuing from step {n}" in capsys.readouterr().out

    expected, resumed = read_records(straight), read_records(killed)
    assert [r["step"] for r in resumed] == list(range(1, 2 * n + 1))
    for want, got in zip(expected, resumed, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=1e-6), got["step"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12), got["step"]
    evals = [r["step"] for r in read_records(killed, "eval")]
    assert evals == [3, 6, 8]
    assert read_records(killed, "eval")[-1]["val_loss"] == pytest.approx(
        read_records(straight, "eval")[-1]["val_loss"], abs=1e-6
    )
    straight_result = json.loads((straight / "result.json").read_text())
    resumed_result = json.loads((killed / "result.json").read_text())
    assert resumed_result["tokens_seen"] == straight_result["tokens_seen"]


def test_resume_at_final_step_rewrites_outputs(tmp_path: Path, corpus: Path) -> None:
    config = tiny_config(corpus, steps=2)
    first = train_run(config, tmp_path / "run", progress=False, log=lambda line: None)
    (tmp_path / "run" / "result.json").unlink()
    again = train_run(config, tmp_path / "run", resume=True, progress=False, log=lambda line: None)
    assert again.val_loss == pytest.approx(first.val_loss, abs=1e-6)
    assert (tmp_path / "run" / "result.json").exists()


def test_checkpoint_holds_training_state(tmp_path: Path, corpus: Path) -> None:
    config = tiny_config(corpus, steps=2)
    train_run(config, tmp_path, progress=False, log=lambda line: None)
    state = read_checkpoint(tmp_path)
    for key in ("model", "optimizer", "scheduler", "rng", "step", "tokens_seen", "config", "elapsed_s"):
        assert key in state, key
    assert state["step"] == 2
    assert state["parallel"] == "none"
    assert set(state["rng"]) >= {"torch", "data", "python"}
    assert all(isinstance(name, str) for name in state["optimizer"]["state"])


def _model_and_optimizer(config: Any) -> tuple[DecoderLM, torch.optim.Optimizer]:
    """Build a fresh model and optimizer as train_run does, with the scheduler that adds initial_lr."""
    torch.manual_seed(1)
    model = DecoderLM(config.model)
    optimizer = build_optimizer(model, config.train)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer


def test_wrapped_state_dict_loads_into_plain_model(tmp_path: Path, corpus: Path) -> None:
    config = tiny_config(corpus, steps=1)
    train_run(config, tmp_path, progress=False, log=lambda line: None)
    state = read_checkpoint(tmp_path)
    plain_values = state["model"]

    # Names as torch.compile (OptimizedModule) and DDP write them, and as DDP around a compiled model.
    compiled_names = torch.compile(DecoderLM(config.model)).state_dict().keys()
    assert all(name.startswith("_orig_mod.") for name in compiled_names)
    for prefix in ("_orig_mod.", "module.", "module._orig_mod."):
        state["model"] = {prefix + name: value for name, value in plain_values.items()}
        model, optimizer = _model_and_optimizer(config)
        restore_model_and_optimizer(state, tmp_path, model, optimizer)
        for name, value in model.state_dict().items():
            assert torch.equal(value, plain_values[name]), (prefix, name)
        assert len(optimizer.state) == len(list(model.parameters()))


def test_strip_wrapper_prefixes_keeps_plain_names() -> None:
    assert strip_wrapper_prefixes("model.layers.0.attn_router.query") == "model.layers.0.attn_router.query"
    assert strip_wrapper_prefixes("module._orig_mod.lm_head.weight") == "lm_head.weight"
    assert (
        strip_wrapper_prefixes("model.layers.1._checkpoint_wrapped_module.mlp.up_proj.weight")
        == "model.layers.1.mlp.up_proj.weight"
    )


def test_killed_checkpoint_write_keeps_previous(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(corpus, steps=4, checkpoint_interval=2)
    train_run(config, tmp_path, progress=False, log=lambda line: None)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    class Killed(BaseException):
        """Stands for SIGKILL: no handler in the code under test catches it."""

    def save_half_then_die(state: Any, handle: Any) -> None:
        handle.write(before[: len(before) // 2])
        raise Killed

    monkeypatch.setattr(checkpoint_module.torch, "save", save_half_then_die)
    with pytest.raises(Killed):
        train_run(config, tmp_path, resume=True, progress=False, log=lambda line: None)
    monkeypatch.undo()

    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert read_checkpoint(tmp_path)["step"] == 4
    leftovers = [entry.name for entry in tmp_path.iterdir() if entry.name.endswith(".tmp")]
    assert leftovers == [f".{CHECKPOINT_FILE}.tmp"]
    train_run(config, tmp_path, resume=True, progress=False, log=lambda line: None)
    assert not [entry.name for entry in tmp_path.iterdir() if entry.name.endswith(".tmp")]


def test_checkpoint_write_fsyncs_file_and_folder(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real_fsync(descriptor)

    monkeypatch.setattr(checkpoint_module.os, "fsync", recording_fsync)
    checkpoint_module._write_file_atomic(tmp_path / CHECKPOINT_FILE, {"step": 1})
    assert synced == ["file", "folder"]


def test_truncate_metrics_drops_later_and_partial_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps({"event": "train", "step": 1}),
        json.dumps({"event": "eval", "step": 2}),
        json.dumps({"event": "train", "step": 3}),
        '{"event": "train", "st',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert truncate_metrics(tmp_path, 2) == 2
    kept = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert kept == lines[:2]
    assert truncate_metrics(tmp_path, 2) == 0


def test_content_digest_sees_changed_tensor_bytes() -> None:
    state = {"model": {"w": torch.arange(6.0)}, "step": 3}
    digest = content_digest(state)
    assert content_digest({"step": 3, "model": {"w": torch.arange(6.0)}}) == digest
    state["model"]["w"][2] = 2.5
    assert content_digest(state) != digest
    assert content_digest({"model": {"w": torch.arange(6.0)}, "step": 4}) != digest


def test_resume_rejects_file_without_digest(tmp_path: Path, corpus: Path) -> None:
    config = tiny_config(corpus, steps=1)
    train_run(config, tmp_path, progress=False, log=lambda line: None)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    del state["digest"]
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        read_checkpoint(tmp_path)
    with pytest.raises(RunError, match="not a training checkpoint"):
        train_run(config, tmp_path, resume=True, progress=False, log=lambda line: None)
