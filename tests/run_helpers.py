"""Shared pieces of the training-robustness tests: a tiny corpus, tiny run configs and paused subprocesses."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from delta_attnres.runconfig import DataConfig, RunConfig, run_config_from_preset

REPO_ROOT = Path(__file__).resolve().parent.parent
PAUSE_MARKER = "PAUSED-FOR-TEST"

# Runs the CLI with `delta_attnres.train.draw_batch` wrapped so that the process prints PAUSE_MARKER and
# waits at the given call (one call per micro-batch) until the release file exists, at most 120 s.
# Arguments: the call number, the CLI arguments as JSON, the release file.
PAUSED_CLI = """
import json, os, sys, time
import torch
torch.set_num_threads(1)
from delta_attnres import train
from delta_attnres.cli import main

pause_at, args, release = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
draw_batch = train.draw_batch
calls = 0

def paused_draw_batch(*positional, **keywords):
    global calls
    calls += 1
    if calls == pause_at:
        print("PAUSED-FOR-TEST", flush=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not os.path.exists(release):
            time.sleep(0.02)
    return draw_batch(*positional, **keywords)

train.draw_batch = paused_draw_batch
sys.exit(main(args))
"""

WORDS = [
    *("the", "a", "of", "and", "to", "in", "is", "was", "he", "she", "it", "that", "for", "on", "with"),
    *("as", "his", "her", "they", "at", "by", "this", "had", "from", "not", "but", "be", "are", "have"),
    *("king", "queen", "lord", "lady", "night", "day", "sword", "crown", "heart", "love", "death"),
    *("time", "world", "man", "woman"),
]


def write_corpus(folder: Path, documents: int = 6, words_per_document: int = 700) -> Path:
    """Write a few deterministic pseudo-English text files into `folder` and return it."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        words = [rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words_per_document)]
        (folder / f"doc{index}.txt").write_text(" ".join(words), encoding="utf-8")
    return folder


def tiny_config(corpus: Path, scheme: str = "delta", **train: Any) -> RunConfig:
    """Return the `tiny` preset on `corpus` with `scheme` and CPU fp32 training, 2 blocks of 2 layers."""
    values: dict[str, Any] = dict(
        steps=3,
        batch_size=4,
        seq_len=32,
        log_interval=1,
        eval_interval=100,
        eval_windows=4,
        eval_batch_size=4,
        warmup_steps=2,
        device="cpu",
    )
    values.update(train)
    model = {"residual": {"scheme": scheme, "num_blocks": 2}}
    return run_config_from_preset("tiny", model, values, DataConfig(sources=[str(corpus)]))


def read_records(run_dir: Path, event: str = "train") -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def subprocess_env(cache: Path) -> dict[str, str]:
    """Return the environment for a child process: one thread, the test's tokenizer cache, loopback gloo."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DELTA_ATTNRES_CACHE=str(cache), PYTHONPATH=str(REPO_ROOT))
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def start_paused_cli(
    args: list[str], pause_at: int, cache: Path, release: Path, processes: int = 1
) -> subprocess.Popen[str]:
    """Start the CLI in a new session that pauses at micro-batch `pause_at` until `release` exists.

    With `processes` > 1 the CLI runs under torchrun on 127.0.0.1. Returns once every process has
    paused; signal the whole session with os.killpg(process.pid, ...) as a terminal's Ctrl-C does.
    """
    script = release.with_name("paused_cli.py")
    script.write_text(PAUSED_CLI, encoding="utf-8")
    command = [sys.executable, str(script), str(pause_at), json.dumps(args), str(release)]
    if processes > 1:
        launcher = [
            *("-m", "torch.distributed.run", "--nproc_per_node", str(processes)),
            *("--master_addr", "127.0.0.1", "--master_port", str(free_port())),
        ]
        command = [sys.executable, *launcher, *command[1:]]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(cache),
        start_new_session=True,
    )
    assert process.stdout is not None
    output, paused = [], 0
    deadline = time.monotonic() + 180
    for line in process.stdout:
        output.append(line)
        paused += line.strip() == PAUSE_MARKER
        if paused == processes:
            return process
        if time.monotonic() > deadline:
            break
    process.kill()
    _, stderr = process.communicate()
    raise AssertionError(f"the child never paused; stdout: {''.join(output)} stderr: {stderr}")


class FullDiskFile(io.FileIO):
    """A binary file that raises ENOSPC, as a full disk does, once `limit` bytes were written to it."""

    def __init__(self, path: Any, mode: str, limit: int) -> None:
        super().__init__(path, mode.replace("b", ""))
        self.limit = limit
        self.written = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self.written + size > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += size
        return super().write(data)
