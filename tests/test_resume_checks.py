"""--resume keeps a run's settings: train and compare reject changes that a checkpoint cannot absorb.

Also covered: the advice after a run stops before its first checkpoint, damaged result.json and
metrics.jsonl files, and a comparison that was copied to another folder.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from run_helpers import FullDiskFile, read_records, tiny_config, write_corpus

from delta_attnres import checkpoint as checkpoint_module
from delta_attnres import train
from delta_attnres.checkpoint import CHECKPOINT_FILE, read_checkpoint
from delta_attnres.cli import main
from delta_attnres.compare import check_compare_folder, run_compare
from delta_attnres.metrics import read_metrics, truncate_metrics
from delta_attnres.model import DecoderLM
from delta_attnres.runconfig import DataConfig
from delta_attnres.train import RunError, train_run

OTHER_WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do"]
COMPARE_SCHEMES = ("standard", "delta")
COMPARE_TRAIN = dict(
    steps=2,
    batch_size=4,
    seq_len=32,
    warmup_steps=1,
    eval_interval=100,
    eval_windows=4,
    log_interval=1,
    device="cpu",
)


def _quiet(line: str) -> None:
    pass


def write_other_corpus(folder: Path, documents: int = 6, words_per_document: int = 700) -> Path:
    """Write text files whose words differ from write_corpus's, so a tokenizer trained on them differs."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        words = [rng.choice(OTHER_WORDS) for _ in range(words_per_document)]
        (folder / f"doc{index}.txt").write_text(" ".join(words), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_other_corpus(tmp_path_factory.mktemp("other-corpus"))


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "tokenizer-cache"
    monkeypatch.setenv("DELTA_ATTNRES_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A finished 2-step run with its checkpoint at step 2; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cache = tmp_path_factory.getbasetemp() / "tokenizer-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DELTA_ATTNRES_CACHE", str(cache))
        train_run(tiny_config(corpus, steps=2), out, progress=False, log=_quiet)
    return out


@pytest.fixture()
def finished_run(finished_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_template, tmp_path / "run"))


def _compare(
    out: Path, corpus: Path, resume: bool = False, log: Any = _quiet, model: Any = None, **changes: Any
) -> None:
    """Run the test comparison into `out`; `changes` override COMPARE_TRAIN and `model` the preset."""
    run_compare(
        out,
        schemes=COMPARE_SCHEMES,
        preset="tiny",
        data=DataConfig(sources=[str(corpus)]),
        model_changes=model,
        train_changes={**COMPARE_TRAIN, **changes},
        resume=resume,
        progress=False,
        log=log,
    )


def _resume_compare(out: Path, corpus: Path, **options: Any) -> None:
    _compare(out, corpus, resume=True, **options)


@pytest.fixture(scope="module")
def compare_template(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A finished 2-step comparison of standard and delta; tests work on copies of it."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    cache = tmp_path_factory.getbasetemp() / "tokenizer-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DELTA_ATTNRES_CACHE", str(cache))
        _compare(out, corpus)
    return out


@pytest.fixture()
def comparison(compare_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(compare_template, tmp_path / "cmp"))


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


# --- train --resume ------------------------------------------------------------------------------------


def test_resume_rejects_other_data(finished_run: Path, other_corpus: Path, corpus: Path) -> None:
    before = _file_bytes(finished_run)
    with pytest.raises(RunError) as raised:
        train_run(tiny_config(other_corpus, steps=4), finished_run, resume=True, progress=False, log=_quiet)
    message = str(raised.value)
    assert f"data.sources [{str(corpus)!r}] -> [{str(other_corpus)!r}]" in message
    assert "\n" not in message
    assert "--overwrite" in message
    assert _file_bytes(finished_run) == before


def test_resume_rejects_changed_text_of_same_source(tmp_path: Path, corpus: Path) -> None:
    text = Path(shutil.copytree(corpus, tmp_path / "text"))
    out = tmp_path / "run"
    train_run(tiny_config(text, steps=2), out, progress=False, log=_quiet)
    checkpoint = (out / CHECKPOINT_FILE).read_bytes()
    tokenizer = (out / "model" / "tokenizer.json").read_bytes()

    shutil.rmtree(text)
    write_other_corpus(text)
    with pytest.raises(RunError, match=r"the tokenizer of the requested data .* differs from the one"):
        train_run(tiny_config(text, steps=4), out, resume=True, progress=False, log=_quiet)
    assert (out / CHECKPOINT_FILE).read_bytes() == checkpoint
    assert (out / "model" / "tokenizer.json").read_bytes() == tokenizer


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"batch_size": 2}, "train.batch_size 4 -> 2"),
        ({"seq_len": 16}, "train.seq_len 32 -> 16"),
        ({"seed": 1}, "train.seed 0 -> 1"),
    ],
)
def test_resume_rejects_fixed_training_setting(
    finished_run: Path, corpus: Path, change: dict[str, Any], expected: str
) -> None:
    before = (finished_run / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(RunError, match="which a resume cannot change") as raised:
        train_run(
            tiny_config(corpus, steps=4, **change), finished_run, resume=True, progress=False, log=_quiet
        )
    assert expected in str(raised.value)
    assert (finished_run / CHECKPOINT_FILE).read_bytes() == before


def test_resume_with_more_steps_updates_run_json(finished_run: Path, corpus: Path) -> None:
    lines: list[str] = []
    config = tiny_config(corpus, steps=3, lr=1e-3)
    result = train_run(config, finished_run, resume=True, progress=False, log=lines.append)
    assert result.steps == 3
    notice = next(line for line in lines if line.startswith("resume: settings changed"))
    assert "train.steps 2 -> 3" in notice
    assert "train.lr 0.003 -> 0.001" in notice
    run = json.loads((finished_run / "run.json").read_text(encoding="utf-8"))
    assert run["train"]["steps"] == 3
    assert run["train"]["lr"] == 1e-3
    assert read_checkpoint(finished_run)["step"] == 3


def _resume_records(run: Path, corpus: Path, **changes: Any) -> dict[int, dict[str, Any]]:
    """Resume `run` to step 4 with `changes`; return its train records by step."""
    train_run(tiny_config(corpus, steps=4, **changes), run, resume=True, progress=False, log=_quiet)
    return {record["step"]: record for record in read_records(run)}


def _peak_lr_of(step: int, config: Any) -> float:
    """Return the learning rate logged at `step`, which the scheduler sets for the step after it."""
    return float(config.train.lr * train.lr_factor(step, config.train))


def test_resume_applies_changed_lr(finished_run: Path, corpus: Path, tmp_path: Path) -> None:
    unchanged_run = Path(shutil.copytree(finished_run, tmp_path / "unchanged"))
    unchanged = _resume_records(unchanged_run, corpus)
    changed = _resume_records(finished_run, corpus, lr=1e-4)

    for step in (3, 4):
        assert changed[step]["lr"] == pytest.approx(_peak_lr_of(step, tiny_config(corpus, steps=4, lr=1e-4)))
        assert unchanged[step]["lr"] == pytest.approx(_peak_lr_of(step, tiny_config(corpus, steps=4)))
    assert changed[4]["loss"] != unchanged[4]["loss"]
    groups = read_checkpoint(finished_run)["optimizer"]["param_groups"]
    assert {group["name"]: group["initial_lr"] for group in groups}["decay"] == 1e-4


def test_resume_applies_changed_routing_lr(finished_run: Path, corpus: Path) -> None:
    _resume_records(finished_run, corpus, routing_lr=5e-4)
    groups = {group["name"]: group for group in read_checkpoint(finished_run)["optimizer"]["param_groups"]}
    assert groups["routing"]["initial_lr"] == 5e-4
    assert groups["decay"]["initial_lr"] == tiny_config(corpus).train.lr


def test_resume_applies_changed_weight_decay_and_betas(
    finished_run: Path, corpus: Path, tmp_path: Path
) -> None:
    unchanged_run = Path(shutil.copytree(finished_run, tmp_path / "unchanged"))
    _resume_records(unchanged_run, corpus)
    _resume_records(finished_run, corpus, weight_decay=0.5, beta1=0.5, beta2=0.9)

    groups = {group["name"]: group for group in read_checkpoint(finished_run)["optimizer"]["param_groups"]}
    assert groups["decay"]["weight_decay"] == 0.5
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["routing"]["weight_decay"] == 0.0
    for group in groups.values():
        assert tuple(group["betas"]) == (0.5, 0.9)
    changed_weights = read_checkpoint(finished_run)["model"]
    unchanged_weights = read_checkpoint(unchanged_run)["model"]
    assert any(not torch.equal(changed_weights[name], unchanged_weights[name]) for name in changed_weights)


def test_resume_rejects_fewer_steps_than_checkpoint(finished_run: Path, corpus: Path) -> None:
    before = _file_bytes(finished_run)
    with pytest.raises(RunError, match=r"is at step 2, past the requested --steps 1; pass --steps 2 or more"):
        train_run(tiny_config(corpus, steps=1), finished_run, resume=True, progress=False, log=_quiet)
    assert _file_bytes(finished_run) == before


def test_resume_and_overwrite_together_rejected(
    finished_run: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _file_bytes(finished_run)
    args = [
        "train", "--preset", "tiny", "--data", str(corpus), "--steps", "4", "--device", "cpu",
        "--no-progress", "--out", str(finished_run), "--resume", "--overwrite",
    ]  # fmt: skip
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1
    assert "pass only one of them" in stderr
    assert _file_bytes(finished_run) == before


# --- train --init-from ------------------------------------------------------------------------------------


def _init_from_args(folder: Path, corpus: Path, out: Path) -> list[str]:
    return [
        "train", "--preset", "tiny", "--data", str(corpus), "--steps", "1", "--batch-size", "4",
        "--seq-len", "32", "--device", "cpu", "--no-progress", "--init-from", str(folder), "--out", str(out),
    ]  # fmt: skip


def _damage_weights(model_dir: Path, change: Any) -> None:
    """Rewrite the first weight file of `model_dir` with `change` applied to its first tensor."""
    from safetensors.torch import load_file, save_file

    path = sorted(model_dir.glob("*.safetensors"))[0]
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_init_from_run_folder_uses_model(
    finished_run: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tuned"
    assert main(_init_from_args(finished_run, corpus, out)) == 0
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert Path(run["train"]["init_from"]) == finished_run / "model"
    assert Path(run["data"]["tokenizer"]) == finished_run / "model"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda tensor: tensor.index_fill(0, torch.tensor([0]), float("nan")),
            "contains NaN or infinite values",
        ),
        (
            lambda tensor: tensor.index_fill(0, torch.tensor([0]), float("inf")),
            "contains NaN or infinite values",
        ),
        (lambda tensor: tensor.to(torch.int32), "must be floating point"),
    ],
    ids=["nan", "inf", "integer"],
)
def test_init_from_damaged_weights_rejected(
    finished_run: Path,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: Any,
    expected: str,
) -> None:
    _damage_weights(finished_run / "model", change)
    out = tmp_path / "tuned"
    assert main(_init_from_args(finished_run / "model", corpus, out)) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1
    assert stderr.startswith("delta-attnres train: error: ")
    assert expected in stderr
    assert not out.exists()


# --- Runs that stop before their first checkpoint --------------------------------------------------------


def test_full_disk_at_first_checkpoint_advises_overwrite(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = tiny_config(corpus, steps=2)
    monkeypatch.setattr(
        checkpoint_module, "open", lambda file, mode: FullDiskFile(file, mode, 1000), raising=False
    )
    with pytest.raises(RunError) as raised:
        train_run(config, out, progress=False, log=_quiet)
    monkeypatch.undo()
    message = str(raised.value)
    assert "No space left on device" in message
    assert "no checkpoint was written yet" in message
    assert "free disk space, then start the run again with --overwrite" in message
    assert "previous checkpoint" not in message
    assert "--resume" not in message
    assert (out / "run.json").exists()
    assert not (out / CHECKPOINT_FILE).exists()

    with pytest.raises(RunError) as raised:
        train_run(config, out, progress=False, log=_quiet)
    assert "stopped before its first checkpoint" in str(raised.value)
    assert "pass --overwrite to start the run again" in str(raised.value)
    with pytest.raises(RunError) as raised:
        train_run(config, out, resume=True, progress=False, log=_quiet)
    assert "stopped before its first checkpoint" in str(raised.value)
    assert "start the run again with --overwrite" in str(raised.value)

    result = train_run(config, out, overwrite=True, progress=False, log=_quiet)
    assert result.steps == 2


def test_compare_full_disk_advises_compare_resume(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cmp"

    def open_full_for_delta(file: Any, mode: str) -> io.FileIO:
        limit = 1000 if "delta-seed0" in str(file) else 10**9
        return FullDiskFile(file, mode, limit)

    monkeypatch.setattr(checkpoint_module, "open", open_full_for_delta, raising=False)
    with pytest.raises(RunError) as raised:
        _compare(out, corpus)
    monkeypatch.undo()
    message = str(raised.value)
    assert "No space left on device" in message
    assert "no checkpoint of this run was written yet" in message
    assert "free disk space, then run the same compare command again with --resume" in message
    assert "--overwrite" not in message
    assert (out / "runs" / "standard-seed0" / "result.json").exists()

    lines: list[str] = []
    _resume_compare(out, corpus, log=lines.append)
    assert any("standard seed 0: finished earlier" in line for line in lines)
    assert (out / "runs" / "delta-seed0" / "result.json").exists()


def test_train_advice_after_compare_is_train_advice(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        checkpoint_module, "open", lambda file, mode: FullDiskFile(file, mode, 1000), raising=False
    )
    with pytest.raises(RunError) as raised:
        _compare(tmp_path / "cmp", corpus)
    assert "compare" in str(raised.value)
    with pytest.raises(RunError) as raised:
        train_run(tiny_config(corpus, steps=2), tmp_path / "run", progress=False, log=_quiet)
    assert "start the run again with --overwrite" in str(raised.value)
    assert "compare" not in str(raised.value)


def test_resume_without_run_rejected(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(RunError, match="contains no run to continue; start the run without --resume"):
        train_run(tiny_config(corpus, steps=2), tmp_path / "nothing", resume=True, progress=False, log=_quiet)


def _failing_model(error: BaseException) -> type[DecoderLM]:
    """Return a DecoderLM subclass whose training forward pass raises `error`."""

    class FailingDecoderLM(DecoderLM):
        def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if self.training:
                raise error
            return super().forward(input_ids, **kwargs)

    return FailingDecoderLM


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity"
            ),
            "CUDA out of memory. Tried to allocate 20.00 GiB",
        ),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried "
                "to allocate 520000000000 bytes."
            ),
            "DefaultCPUAllocator: not enough memory: you tried to allocate 520000000000 bytes",
        ),
    ],
)
def test_out_of_memory_in_first_step_gives_advice(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, expected: str
) -> None:
    monkeypatch.setattr(train, "DecoderLM", _failing_model(error))
    with pytest.raises(RunError) as raised:
        train_run(tiny_config(corpus, steps=2), tmp_path / "run", progress=False, log=_quiet)
    message = str(raised.value)
    assert message.startswith("out of memory in training step 1 with --batch-size 4, --seq-len 32")
    assert expected in message
    assert "no checkpoint was written yet" in message
    assert message.endswith("then start the run again with --overwrite")
    assert "\n" not in message


def test_other_runtime_error_passes_through(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train, "DecoderLM", _failing_model(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match=r"^shape mismatch$"):
        train_run(tiny_config(corpus, steps=2), tmp_path / "run", progress=False, log=_quiet)


def test_nonfinite_hint_names_learning_rates(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NaNDecoderLM(DecoderLM):
        def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            logits = super().forward(input_ids, **kwargs)
            return logits * float("nan") if self.training else logits

    monkeypatch.setattr(train, "DecoderLM", NaNDecoderLM)
    with pytest.raises(RunError) as raised:
        train_run(tiny_config(corpus, steps=2, routing_lr=0.01), tmp_path / "run", progress=False, log=_quiet)
    message = str(raised.value)
    assert "learning rates in use: lr 0.003, routing lr 0.01" in message
    assert "Lower --lr," not in message
    assert message.endswith("then start the run again with --overwrite")


# --- Damaged metrics.jsonl -----------------------------------------------------------------------------


def test_truncate_metrics_drops_invalid_utf8_line(tmp_path: Path) -> None:
    good = [json.dumps({"event": "train", "step": 1}), json.dumps({"event": "eval", "step": 2})]
    (tmp_path / "metrics.jsonl").write_bytes(
        good[0].encode() + b"\n\xff\xfe{not utf-8\n" + good[1].encode() + b"\n"
    )
    assert truncate_metrics(tmp_path, 2) == 1
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines() == good


def test_resume_metrics_folder_rejected(finished_run: Path, corpus: Path) -> None:
    metrics = finished_run / "metrics.jsonl"
    metrics.unlink()
    metrics.mkdir()
    with pytest.raises(RunError) as raised:
        train_run(tiny_config(corpus, steps=3), finished_run, resume=True, progress=False, log=_quiet)
    message = str(raised.value)
    assert "\n" not in message
    assert f"cannot read {metrics}: Is a directory" in message
    assert "move it away" in message


def test_read_metrics_folder_rejected(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(RunError, match="Is a directory"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("line", [b"\xff\xfe", b'{"event": "eval", "st', b"[1, 2]"])
def test_read_metrics_names_file_and_line(tmp_path: Path, line: bytes) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(json.dumps({"event": "train", "step": 1}).encode() + b"\n" + line + b"\n")
    with pytest.raises(RunError, match=f"line 2 of {path}") as raised:
        read_metrics(tmp_path)
    assert "\n" not in str(raised.value)


# --- compare --resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"steps": 4}, "train.steps 2 -> 4"),
        ({"lr": 1e-3}, "train.lr 0.003 -> 0.001"),
        ({"model": {"hidden_size": 32}}, "model.hidden_size 64 -> 32"),
    ],
)
def test_compare_resume_rejects_other_settings(
    comparison: Path, corpus: Path, changes: dict[str, Any], expected: str
) -> None:
    before = _file_bytes(comparison)
    with pytest.raises(RunError) as raised:
        _resume_compare(comparison, corpus, **changes)
    message = str(raised.value)
    assert f"--resume: {comparison / 'runs' / 'standard-seed0'} was trained with other settings" in message
    assert expected in message
    assert "--overwrite" in message
    assert _file_bytes(comparison) == before


def test_compare_resume_rejects_other_data(comparison: Path, corpus: Path, other_corpus: Path) -> None:
    before = _file_bytes(comparison)
    with pytest.raises(RunError, match=r"data\.sources \["):
        _resume_compare(comparison, other_corpus)
    assert _file_bytes(comparison) == before

    # Without a kept run, the comparison's tokenizer folder still shows that the data changed.
    shutil.rmtree(comparison / "runs")
    tokenizer = _file_bytes(comparison / "tokenizer")
    with pytest.raises(RunError, match=r"the tokenizer in .* differs from the one the requested --data"):
        _resume_compare(comparison, other_corpus)
    assert _file_bytes(comparison / "tokenizer") == tokenizer


def test_compare_resume_rejects_changed_checkpointed_run(comparison: Path, corpus: Path) -> None:
    run_dir = comparison / "runs" / "standard-seed0"
    (run_dir / "result.json").unlink()  # the run now counts as interrupted at its checkpoint
    with pytest.raises(RunError, match=r"train\.lr 0\.003 -> 0\.001") as raised:
        _resume_compare(comparison, corpus, lr=1e-3)
    assert str(run_dir) in str(raised.value)

    # Without run.json, train_run checks the checkpoint with the comparison's stricter rule. The
    # delta run would start again, so only the standard run is checked.
    (run_dir / "run.json").unlink()
    shutil.rmtree(comparison / "runs" / "delta-seed0")
    with pytest.raises(
        RunError, match=r"which a resume cannot change .*train\.lr 0\.003 -> 0\.001"
    ) as raised:
        _resume_compare(comparison, corpus, lr=1e-3)
    assert str(run_dir) in str(raised.value)
    assert read_checkpoint(run_dir)["step"] == 2


def test_compare_resume_reuses_runs_of_copied_folder(
    comparison: Path, corpus: Path, compare_template: Path
) -> None:
    tokenizer = _file_bytes(comparison / "tokenizer")
    lines: list[str] = []
    _resume_compare(comparison, corpus, log=lines.append, log_interval=2)  # an execution setting
    assert sum("finished earlier, reusing" in line for line in lines) == 2
    assert _file_bytes(comparison / "tokenizer") == tokenizer
    report = json.loads((comparison / "report.json").read_text(encoding="utf-8"))
    for scheme in COMPARE_SCHEMES:
        assert report["schemes"][scheme]["runs"][0]["out_dir"] == f"runs/{scheme}-seed0"

    # result.json still names the folder the runs were trained in; the copy must not read from there.
    stored = json.loads((comparison / "runs" / "delta-seed0" / "result.json").read_text(encoding="utf-8"))
    assert stored["out_dir"] == str(compare_template / "runs" / "delta-seed0")
    weights = comparison / "runs" / "delta-seed0" / "model" / "model.safetensors"
    weights.unlink()
    with pytest.raises(Exception, match=str(weights.parent)):
        _resume_compare(comparison, corpus)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{bad", "is damaged: it is not valid UTF-8 JSON"),
        (b"\xff\xfe", "is damaged: it is not valid UTF-8 JSON"),
        (b"[1, 2]", "contains list, not a JSON object"),
        (b"{}", "lacks the field(s) scheme, seed, val_loss"),
        (b'{"scheme": "standard"}', "lacks the field(s) seed"),
    ],
)
def test_compare_resume_names_damaged_result_file(
    comparison: Path, corpus: Path, content: bytes, expected: str
) -> None:
    path = comparison / "runs" / "standard-seed0" / "result.json"
    path.write_bytes(content)
    with pytest.raises(RunError) as raised:
        _resume_compare(comparison, corpus)
    message = str(raised.value)
    assert str(path) in message
    assert expected in message
    assert "rebuild it from the run's checkpoint" in message
    assert "\n" not in message


def test_compare_resume_rebuilds_deleted_result_file(comparison: Path, corpus: Path) -> None:
    path = comparison / "runs" / "standard-seed0" / "result.json"
    before = json.loads(path.read_text(encoding="utf-8"))
    path.unlink()
    _resume_compare(comparison, corpus)
    after = json.loads(path.read_text(encoding="utf-8"))
    assert after["val_loss"] == pytest.approx(before["val_loss"], abs=1e-6)
    assert after["tokens_seen"] == before["tokens_seen"]


def test_compare_resume_wrong_field_type(comparison: Path, corpus: Path) -> None:
    path = comparison / "runs" / "standard-seed0" / "result.json"
    values = json.loads(path.read_text(encoding="utf-8"))
    values["steps"] = "two"
    path.write_text(json.dumps(values), encoding="utf-8")
    with pytest.raises(RunError, match="field steps = 'two' is not of type int"):
        _resume_compare(comparison, corpus)


def test_compare_resume_and_overwrite_together_rejected(comparison: Path, corpus: Path) -> None:
    before = _file_bytes(comparison)
    with pytest.raises(RunError, match="pass only one of them"):
        run_compare(
            comparison,
            schemes=COMPARE_SCHEMES,
            preset="tiny",
            data=DataConfig(sources=[str(corpus)]),
            train_changes=COMPARE_TRAIN,
            overwrite=True,
            resume=True,
            progress=False,
            log=_quiet,
        )
    assert _file_bytes(comparison) == before


def test_compare_cli_rejects_other_steps(
    comparison: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "compare", "--preset", "tiny", "--schemes", ",".join(COMPARE_SCHEMES), "--data", str(corpus),
        "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "1",
        "--eval-interval", "100", "--eval-windows", "4", "--log-interval", "1", "--device", "cpu",
        "--no-progress", "--out", str(comparison), "--resume",
    ]  # fmt: skip
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1
    assert stderr.startswith("delta-attnres compare: error: --resume: ")
    assert "train.steps 2 -> 12" in stderr


def test_compare_rejects_unrelated_nonempty_folder(tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n", encoding="utf-8")

    for overwrite, resume in ((False, False), (True, False), (False, True)):
        with pytest.raises(RunError, match="is not empty and contains no comparison"):
            check_compare_folder(out, overwrite=overwrite, resume=resume)

    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me\n"
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
