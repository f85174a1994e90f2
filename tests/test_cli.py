"""End-to-end runs of the command line on real text, and its handling of bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from delta_attnres.cli import main

TINY = ["--preset", "tiny", "--no-progress"]


def _write_corpus(folder: Path, documents: int = 4, repeat: int = 60) -> Path:
    """Write a few short English text files (public-domain verse) into `folder`."""
    lines = [
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.",
        "When in disgrace with fortune and men's eyes, I all alone beweep my outcast state.",
        "Let me not to the marriage of true minds admit impediments. Love is not love which alters.",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        text = "\n".join(lines[(index + k) % len(lines)] for k in range(repeat))
        (folder / f"doc{index}.txt").write_text(text, encoding="utf-8")
    return folder


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_eval_on_default_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, stdout, _ = _run(
        [
            "train",
            *TINY,
            "--scheme",
            "delta_block",
            "--num-blocks",
            "2",
            "--steps",
            "12",
            "--eval-interval",
            "6",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "val_perplexity" in stdout
    for name in (
        "run.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "result.json",
        "model/config.json",
        "model/model.safetensors",
    ):
        assert (out / name).exists(), name
    result = json.loads((out / "result.json").read_text())
    assert result["scheme"] == "delta_block"
    assert result["tokens_seen"] == 12 * 8 * 64
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["event"] == "eval"] == [6, 12]

    code, stdout, _ = _run(["eval", "--model", str(out), "--seq-len", "64", "--max-windows", "8"], capsys)
    assert code == 0
    perplexity = float(stdout.split("perplexity")[1].split("|")[0])
    assert 1.0 < perplexity < 512
    bits_per_byte = float(stdout.split("bits per byte")[1].split("|")[0])
    assert 0.0 < bits_per_byte < 8.0


def test_train_is_deterministic_for_a_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _write_corpus(tmp_path / "text")
    losses = []
    for name in ("a", "b"):
        args = [
            "train",
            *TINY,
            "--data",
            str(corpus),
            "--steps",
            "4",
            "--log-interval",
            "1",
            "--eval-interval",
            "4",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / name),
        ]
        assert _run(args, capsys)[0] == 0
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if r["event"] == "train"])
    assert losses[0] == losses[1]


def test_compare_two_schemes_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare"
    code, _, _ = _run(
        [
            "compare",
            *TINY,
            "--schemes",
            "standard,delta",
            "--steps",
            "10",
            "--eval-interval",
            "5",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["schemes"]) == ["standard", "delta"]
    vocab = report["model"]["vocab_size"]
    for scheme, entry in report["schemes"].items():
        assert math.isfinite(entry["val_perplexity"]), scheme
        assert 1.0 < entry["val_perplexity"] < vocab, scheme
        assert 0.0 < entry["val_bits_per_byte"] < 8.0, scheme
        assert entry["tokens_seen"] == 10 * 8 * 64, scheme
    assert report["schemes"]["standard"]["params_routing"] == 0
    assert report["schemes"]["delta"]["params_routing"] > 0
    assert report["schemes"]["delta"]["routing"]["deep"]["uniform_weight"] < 1.0
    markdown = (out / "report.md").read_text()
    assert "| `delta` |" in markdown
    assert "| `standard` |" in markdown
    for png in ("loss_curves.png", "routing_max_weight.png"):
        with Image.open(out / png) as image:
            assert image.size[0] > 300 and image.size[1] > 200, png


def test_compare_with_seeds_reports_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _write_corpus(tmp_path / "text")
    out = tmp_path / "compare"
    code, _, _ = _run(
        [
            "compare",
            *TINY,
            "--data",
            str(corpus),
            "--schemes",
            "delta",
            "--seeds",
            "0,1",
            "--steps",
            "3",
            "--eval-interval",
            "3",
            "--seq-len",
            "32",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    entry = json.loads((out / "report.json").read_text())["schemes"]["delta"]
    assert [run["seed"] for run in entry["runs"]] == [0, 1]
    assert entry["val_perplexity_std"] > 0.0
    assert "±" in (out / "report.md").read_text()


def test_module_entry_point_prints_help() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "delta_attnres", "--help"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0
    for command in ("train", "eval", "compare"):
        assert command in completed.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--scheme", "deltaa"], "'deltaa'"),
        (["--num-blocks", "3"], "num_blocks = 3"),
        (["--hidden-size", "0"], "hidden_size = 0"),
        (["--lr", "-1"], "lr = -1"),
    ],
)
def test_train_rejects_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    out = tmp_path / "run"
    code, _, stderr = _run(
        ["train", "--no-progress", "--preset", "tiny", "--scheme", "delta_block", *args, "--out", str(out)],
        capsys,
    )
    assert code == 2
    assert expected in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_compare_rejects_unknown_scheme(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = _run(
        ["compare", *TINY, "--schemes", "standard,nope", "--out", str(tmp_path / "c")], capsys
    )
    assert code == 2
    assert "unknown scheme 'nope'" in stderr


def test_bad_data_gives_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    short = _write_corpus(tmp_path / "short", documents=2, repeat=1)
    cases = [
        ([str(tmp_path / "missing.txt")], "missing.txt"),
        ([str(empty)], "empty.txt"),
        ([str(latin), str(empty)], "latin.txt"),
        ([str(short)], "--seq-len"),
    ]
    for sources, expected in cases:
        out = tmp_path / "run"
        code, _, stderr = _run(["train", *TINY, "--data", *sources, "--out", str(out)], capsys)
        assert code == 2, sources
        assert expected in stderr, (sources, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert not (out / "run.json").exists(), sources
    assert latin.read_bytes() == "caf\xe9 au lait\n".encode("latin-1") * 10


def test_existing_run_is_kept_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _write_corpus(tmp_path / "text")
    out = tmp_path / "run"
    args = [
        "train",
        *TINY,
        "--data",
        str(corpus),
        "--steps",
        "2",
        "--eval-interval",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(out),
    ]
    assert _run(args, capsys)[0] == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}

    code, _, stderr = _run(args, capsys)
    assert code == 2
    assert "--overwrite" in stderr
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert after == before

    assert _run([*args, "--overwrite"], capsys)[0] == 0


def test_compare_refuses_existing_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare"
    out.mkdir()
    (out / "report.json").write_text("{}", encoding="utf-8")
    code, _, stderr = _run(["compare", *TINY, "--out", str(out)], capsys)
    assert code == 2
    assert "--resume" in stderr
    assert (out / "report.json").read_text() == "{}"


def test_eval_rejects_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = _run(["eval", "--model", str(tmp_path / "nothing")], capsys)
    assert code == 2
    assert "nothing" in stderr


def test_train_rejects_unrelated_nonempty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "important.bin").write_bytes(b"user data")
    code, _, stderr = _run(["train", *TINY, "--steps", "2", "--out", str(out), "--overwrite"], capsys)
    assert code == 2
    assert "not empty" in stderr
    assert (out / "model" / "important.bin").read_bytes() == b"user data"


def test_atomic_writes_use_the_umask(tmp_path: Path) -> None:
    import os

    from delta_attnres.storage import replace_folder, write_text_atomic

    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.md", "text")
        replace_folder(tmp_path / "model", lambda folder: (folder / "config.json").write_text("{}"))
    finally:
        os.umask(previous)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
