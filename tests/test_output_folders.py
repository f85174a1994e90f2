"""Output folders of every command: checks before any work starts, and what --overwrite may replace."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from delta_attnres import bench
from delta_attnres.cli import main
from delta_attnres.config import ModelConfig
from delta_attnres.model import DecoderLM
from delta_attnres.storage import (
    StorageError,
    check_output_path,
    model_folder_problem,
    replace_folder,
    save_model_folder,
)

CONVERT = ["--scheme", "delta"]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint folder, as save_pretrained writes it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    folder = tmp_path_factory.mktemp("llama") / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _tiny_model() -> DecoderLM:
    config = ModelConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    return DecoderLM(config)


def _user_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work", encoding="utf-8")
    return folder


def _tiny_bench_config(**changes: Any) -> bench.BenchConfig:
    values: dict[str, Any] = dict(
        schemes=("standard", "delta_block"),
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        vocab_size=32,
        num_blocks=2,
        batch_size=1,
        seq_len=8,
        rounds=1,
        warmup_steps=0,
        depths=(),
        naive=False,
        peak_memory=False,
        decode_tokens=0,
        prompt_tokens=4,
    )
    values.update(changes)
    return bench.BenchConfig(**values)


# check_output_path


def test_output_path_accepts_new_folder(tmp_path: Path) -> None:
    assert check_output_path(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"


def test_output_path_rejects_empty() -> None:
    with pytest.raises(StorageError, match="--out is empty"):
        check_output_path("")


def test_output_path_rejects_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")

    with pytest.raises(StorageError, match="exists and is not a folder"):
        check_output_path(tmp_path / "notes.txt")


@pytest.mark.parametrize("below", ["sub", "sub/deeper", ".."])
def test_output_path_rejects_below_file(tmp_path: Path, below: str) -> None:
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")

    with pytest.raises(StorageError, match="lies below the file"):
        check_output_path(tmp_path / "notes.txt" / below, "--report")


@pytest.mark.skipif(os.geteuid() == 0, reason="os.access ignores folder modes for root")
def test_output_path_rejects_read_only(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(StorageError, match="is not writable"):
            check_output_path(locked / "run")
    finally:
        locked.chmod(0o700)


def test_output_path_rejects_dangling_link(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "missing")

    with pytest.raises(StorageError, match=r"points to .*missing, which does not exist"):
        check_output_path(tmp_path / "link")
    with pytest.raises(StorageError, match=r"points to .*missing, which does not exist"):
        check_output_path(tmp_path / "link" / "run")
    assert not (tmp_path / "missing").exists()


def test_output_path_rejects_link_loop(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")

    with pytest.raises(StorageError, match=r"symbolic link .* is part of a loop"):
        check_output_path(tmp_path / "a")
    with pytest.raises(StorageError, match=r"cannot be used: .*symbolic links"):
        check_output_path(tmp_path / "a" / "run")


def test_output_path_rejects_link_to_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    (tmp_path / "link").symlink_to(tmp_path / "notes.txt")

    with pytest.raises(StorageError, match="which is not a folder"):
        check_output_path(tmp_path / "link")


def test_output_path_accepts_link_to_folder(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")

    assert check_output_path(tmp_path / "link" / "run") == tmp_path / "link" / "run"
    assert list((tmp_path / "real").iterdir()) == []


def test_output_path_rejects_long_name(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"cannot be used: \[Errno 36\] File name too long"):
        check_output_path(tmp_path / ("a" * 300))


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs a mounted /proc")
def test_output_path_rejects_proc() -> None:
    with pytest.raises(StorageError, match="creating a folder in /proc failed"):
        check_output_path("/proc/run")


@pytest.mark.parametrize("command", ["train", "compare", "routing", "convert", "bench"])
def test_commands_check_out_first(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], llama_source: Path
) -> None:
    arguments = {
        "train": ["train", "--preset", "tiny", "--steps", "1", "--no-progress"],
        "compare": ["compare", "--preset", "tiny", "--steps", "1", "--no-progress"],
        "routing": ["routing", "--model", str(llama_source)],
        "convert": ["convert", "--from", str(llama_source), *CONVERT],
        "bench": ["bench", "--quick", "--no-peak-memory"],
    }[command]
    notes = tmp_path / "notes.txt"
    notes.write_text("x", encoding="utf-8")
    cases = [("", "--out is empty"), (str(notes), "exists and is not a folder")]
    cases.append((str(notes / "sub"), "lies below the file"))
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    cases.append((str(tmp_path / "dangling"), "which does not exist"))
    cases.append((str(tmp_path / "dangling" / "sub"), "which does not exist"))
    cases.append((str(tmp_path / "loop_a"), "is part of a loop"))
    cases.append((str(tmp_path / ("a" * 300)), "File name too long"))

    for out, message in cases:
        code, stdout, stderr = _run([*arguments, "--out", out], capsys)

        assert code == 2, out
        assert f"delta-attnres {command}: error:" in stderr, out
        assert message in stderr, out
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert "logit difference" not in stdout, out
    assert notes.read_text(encoding="utf-8") == "x"


# Folders that convert --overwrite may replace


def test_model_folder_problem_accepts_saved_model(tmp_path: Path) -> None:
    save_model_folder(_tiny_model(), tmp_path / "model")
    (tmp_path / "blank").mkdir()

    assert model_folder_problem(tmp_path / "model") is None
    assert model_folder_problem(tmp_path / "blank") is None


def test_model_folder_problem_names_foreign_files(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_model_folder(_tiny_model(), folder)
    (folder / "README.txt").write_text("mine", encoding="utf-8")
    (folder / "checkpoints").mkdir()

    problem = model_folder_problem(folder)

    assert problem is not None
    assert "README.txt" in problem
    assert "checkpoints" in problem


def test_model_folder_problem_rejects_other_model_type(tmp_path: Path, llama_source: Path) -> None:
    problem = model_folder_problem(llama_source)

    assert problem is not None
    assert "'llama'" in problem


def test_convert_keeps_folder_containing_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], llama_source: Path
) -> None:
    parent = _user_folder(tmp_path / "hfcopy")
    shutil.copytree(llama_source, parent / "llama")

    code, stdout, stderr = _run(
        ["convert", "--from", str(parent / "llama"), *CONVERT, "--out", str(parent), "--overwrite"], capsys
    )

    assert code == 2
    assert "contains the source folder" in stderr
    assert "logit difference" not in stdout
    assert (parent / "thesis.txt").read_text(encoding="utf-8") == "years of work"
    assert (parent / "llama" / "config.json").is_file()


def test_convert_rejects_out_inside_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], llama_source: Path
) -> None:
    out = llama_source / "converted"

    code, _, stderr = _run(["convert", "--from", str(llama_source), *CONVERT, "--out", str(out)], capsys)

    assert code == 2
    assert "lies inside the source folder" in stderr
    assert not out.exists()


def test_convert_keeps_run_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], llama_source: Path
) -> None:
    run = tmp_path / "run"
    save_model_folder(_tiny_model(), run / "model")
    (run / "run.json").write_text('{"model": {}}', encoding="utf-8")
    weights = (run / "model" / "model.safetensors").read_bytes()
    (tmp_path / "link").symlink_to(run / "model")
    arguments = ["convert", "--from", str(llama_source), *CONVERT, "--overwrite", "--out"]

    for out in (run / "model", tmp_path / "link"):
        code, stdout, stderr = _run([*arguments, str(out)], capsys)

        assert code == 2, out
        assert f"belongs to the training run at {run}, which has a run.json" in stderr, out
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert "logit difference" not in stdout, out
    assert (run / "model" / "model.safetensors").read_bytes() == weights


def test_convert_rejects_missing_run_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], llama_source: Path
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}", encoding="utf-8")
    out = tmp_path / "run" / "model"

    code, _, stderr = _run(["convert", "--from", str(llama_source), *CONVERT, "--out", str(out)], capsys)

    assert code == 2
    assert "belongs to the training run at" in stderr
    assert not out.exists()


def test_convert_keeps_user_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], llama_source: Path
) -> None:
    folder = _user_folder(tmp_path / "mydocs")

    code, stdout, stderr = _run(
        ["convert", "--from", str(llama_source), *CONVERT, "--out", str(folder), "--overwrite"], capsys
    )

    assert code == 2
    assert "is not a delta-attnres model folder" in stderr
    assert "thesis.txt" in stderr
    assert "choose a new or empty --out" in stderr
    assert "logit difference" not in stdout
    assert (folder / "thesis.txt").read_text(encoding="utf-8") == "years of work"


def test_convert_keeps_current_folder(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    llama_source: Path,
) -> None:
    folder = _user_folder(tmp_path / "work")
    monkeypatch.chdir(folder)

    code, _, stderr = _run(
        ["convert", "--from", str(llama_source), *CONVERT, "--out", ".", "--overwrite"], capsys
    )

    assert code == 2
    assert "empty name" not in stderr
    assert f"({folder.resolve()})" in stderr
    assert (folder / "thesis.txt").is_file()


def test_convert_replaces_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], llama_source: Path
) -> None:
    out = tmp_path / "converted"
    sibling = _user_folder(tmp_path / "converted.old")
    out.mkdir()  # an empty folder needs no --overwrite

    assert _run(["convert", "--from", str(llama_source), *CONVERT, "--out", str(out)], capsys)[0] == 0
    code, _, stderr = _run(["convert", "--from", str(llama_source), *CONVERT, "--out", str(out)], capsys)
    assert code == 2
    assert "already exists; pass --overwrite" in stderr

    arguments = ["convert", "--from", str(llama_source), "--scheme", "delta_block", "--num-blocks", "2"]
    assert _run([*arguments, "--out", str(out), "--overwrite"], capsys)[0] == 0
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["residual"]["scheme"] == "delta_block"
    assert (sibling / "thesis.txt").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted", "converted.old"]


def test_replace_folder_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old", encoding="utf-8")
    monkeypatch.chdir(target)

    replace_folder(Path("."), lambda folder: (folder / "config.json").write_text("new", encoding="utf-8"))

    monkeypatch.chdir(tmp_path)
    assert (target / "config.json").read_text(encoding="utf-8") == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_replace_folder_keeps_link_target(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text("old", encoding="utf-8")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)

    replace_folder(tmp_path / "link", lambda folder: (folder / "config.json").write_text("new"))

    assert (real / "config.json").read_text(encoding="utf-8") == "old"
    assert not (tmp_path / "link").is_symlink()
    assert (tmp_path / "link" / "config.json").read_text(encoding="utf-8") == "new"


# routing and bench: existing output needs --overwrite


def test_routing_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "routing"
    out.mkdir()
    (out / "routing_heatmap_delta.png").write_bytes(b"png")
    arguments = ["routing", "--model", str(tmp_path / "routing"), "--out", str(out)]

    code, _, stderr = _run(arguments, capsys)
    assert code == 2
    assert "already contains routing output (routing_heatmap_delta.png)" in stderr
    assert "--overwrite" in stderr

    code, _, stderr = _run([*arguments, "--overwrite"], capsys)
    assert code == 2  # the folder contains no model, which is checked after --out
    assert "already contains routing output" not in stderr


def test_bench_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / bench.RESULT_FILE).write_text('{"mine": 1}', encoding="utf-8")

    code, stdout, stderr = _run(["bench", "--quick", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "already exists; pass --overwrite" in stderr
    assert stdout == ""

    bench.run_bench(_tiny_bench_config(), tmp_path, command="test", log=lambda line: None, overwrite=True)
    result = json.loads((tmp_path / bench.RESULT_FILE).read_text(encoding="utf-8"))
    assert result["complete"] is True
    assert result["settings"]["num_blocks"] == 2


# bench settings


def test_bench_rejects_uneven_num_blocks() -> None:
    with pytest.raises(ValueError, match="--num-blocks 3 does not divide the layer counts 2, 4 "):
        bench.bench_config(quick=True, num_blocks=3)
    with pytest.raises(ValueError, match=r"the layer count 3 \(--layers 2, --depths 2,3\)"):
        bench.bench_config(quick=True, depths="2,3")
    with pytest.raises(
        ValueError, match=r"does not divide the layer counts 6, 10 \(--layers 4, --depths 6,10\)"
    ):
        bench.bench_config(quick=True, num_layers=4, num_blocks=4, depths="6,10")


def test_bench_uses_requested_num_blocks() -> None:
    config = bench.bench_config(quick=True, num_blocks=1, depths="3")

    for depth in (config.num_layers, *config.depths):
        for scheme in config.schemes:
            assert config.model_config(scheme, depth).residual.num_blocks == 1


def test_bench_num_blocks_without_block_schemes() -> None:
    config = bench.bench_config(quick=True, schemes="standard,delta", num_blocks=3)

    assert config.num_blocks == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(vocab_size=0), "--vocab-size 0 is invalid: expected a positive integer"),
        (dict(hidden_size=-64), "--hidden-size -64 is invalid"),
        (dict(num_layers=0), "--layers 0 is invalid"),
        (dict(intermediate_size=0), "--intermediate-size 0 is invalid"),
        (dict(num_blocks=0), "--num-blocks 0 is invalid"),
        (dict(decode_tokens=-1), "--decode-tokens -1 is invalid: expected 0 or a positive integer"),
        (dict(depths="0"), "--depths 0 is invalid: expected positive layer counts"),
        (dict(depths="4,-4"), "--depths 4,-4 is invalid"),
        (dict(num_heads=3), r"model\.num_heads = 3 \(--num-heads\) is invalid"),
    ],
)
def test_bench_rejects_invalid_setting(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bench.bench_config(quick=True, **changes)


def test_bench_command_rejects_before_measuring(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags, message in [
        (["--vocab-size", "0"], "--vocab-size 0 is invalid"),
        (["--decode-tokens", "-1"], "--decode-tokens -1 is invalid"),
        (["--num-blocks", "3"], "--num-blocks 3 does not divide"),
        (["--depths", "-4"], "--depths -4 is invalid"),
    ]:
        code, stdout, stderr = _run(["bench", "--quick", "--out", str(tmp_path), *flags], capsys)

        assert code == 2, flags
        assert message in stderr, flags
        assert stdout == "", flags
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "changes",
    [
        dict(num_layers=10**9, depths="none"),
        dict(depths="1000000000"),
        dict(seq_len=10**9, depths="none"),
        dict(vocab_size=10**9),
        dict(hidden_size=10**9),
        dict(batch_size=10**9),
        dict(intermediate_size=10**9),
    ],
)
def test_bench_rejects_too_much_memory(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"the benchmark needs at least .* of memory, but this machine has"):
        bench.bench_config(quick=True, **changes)


def test_bench_memory_message_names_flags() -> None:
    with pytest.raises(ValueError) as raised:
        bench.bench_config(quick=True, num_layers=10**9, depths="none")

    message = str(raised.value)
    assert "at 1,000,000,000 layers (--layers 1000000000, --depths none)" in message
    assert "lower --batch-size or --seq-len" in message


def test_bench_rejects_long_decode() -> None:
    assert bench.bench_config(quick=True, decode_tokens=bench.MAX_DECODE_CONTEXT - 4).decode_tokens == 65532

    with pytest.raises(
        ValueError, match="--decode-tokens 65533 plus the 4 prompt tokens exceed 65,536 tokens"
    ):
        bench.bench_config(quick=True, decode_tokens=bench.MAX_DECODE_CONTEXT - 3)
    with pytest.raises(ValueError, match="--decode-tokens 1000000000 plus"):
        bench.bench_config(quick=True, decode_tokens=10**9)


def test_bench_command_rejects_size_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flags in (["--layers", "1000000000", "--depths", "none"], ["--decode-tokens", "1000000000"]):
        code, stdout, stderr = _run(["bench", "--quick", "--out", str(tmp_path / "b"), *flags], capsys)

        assert code == 2, flags
        assert "delta-attnres bench: error:" in stderr, flags
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert stdout == "", flags
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            dict(schemes="standard,standard"),
            "--schemes standard,standard lists the scheme standard more than once",
        ),
        (dict(schemes="standard,delta,delta"), "lists the scheme delta more than once"),
        (dict(schemes=","), "--schemes ',' names no scheme"),
        (dict(schemes="delta"), "--schemes delta must include 'standard'"),
        (dict(depths="4,4"), "--depths 4,4 lists the depth 4 more than once"),
        (dict(depths=",,"), "--depths ',,' names no layer count; pass 'none' to skip the depth sweep"),
    ],
)
def test_bench_rejects_invalid_list(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.bench_config(quick=True, **changes)


def test_bench_accepts_list_spacing() -> None:
    config = bench.bench_config(quick=True, schemes=" standard , delta, ", depths="2, 4,")

    assert config.schemes == ("standard", "delta")
    assert config.depths == (2, 4)
    assert bench.bench_config(quick=True, depths="none").depths == ()
