"""Input checks of eval, routing, generate and the training flags, run through the command line in-process.

Every bad input must end in one error line and exit status 2 before any model, batch or folder is
allocated. The model folders here are tiny (context 64, vocabulary 320), so each check takes well under
a second.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import tiny_config, tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

from delta_attnres.analysis import effective_rank
from delta_attnres.cli import main
from delta_attnres.config import ModelConfig, ResidualConfig
from delta_attnres.data import DataError, Document, load_tokenizer, train_tokenizer
from delta_attnres.hf_format import model_config_from_hf_dict
from delta_attnres.model import DecoderLM
from delta_attnres.runconfig import MAX_SEED, DataConfig, RunConfig, TrainConfig
from delta_attnres.storage import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    StorageError,
    read_model_config,
    save_model_folder,
)

CONTEXT = 64  # max_seq_len of tiny_config
EVAL = ["--seq-len", "16", "--max-windows", "2", "--device", "cpu"]
TINY_TRAIN = ["train", "--preset", "tiny", "--no-progress", "--steps", "2"]
VERSES = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.",
    "When in disgrace with fortune and men's eyes, I all alone beweep my outcast state.",
    "Let me not to the marriage of true minds admit impediments. Love is not love which alters.",
]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail, and return its one error line."""
    code, _, stderr = _run(args, capsys)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert ": error: " in lines[0]
    return lines[0]


def _write_corpus(folder: Path, documents: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        text = "\n".join(VERSES[(index + k) % len(VERSES)] for k in range(12))
        (folder / f"doc{index}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A corpus, a model folder, and a run folder whose run.json records the corpus as training data."""
    root = tmp_path_factory.mktemp("validation")
    corpus = _write_corpus(root / "corpus")
    model_dir = root / "model"
    save_model_folder(tiny_model("delta"), model_dir, tiny_tokenizer())

    run_dir = root / "run"
    run_dir.mkdir()
    shutil.copytree(model_dir, run_dir / "model")
    config = RunConfig(
        model=tiny_config("delta"), train=TrainConfig(seq_len=16), data=DataConfig(sources=[str(corpus)])
    )
    (run_dir / "run.json").write_text(json.dumps(config.to_dict()), encoding="utf-8")
    return {"root": root, "corpus": corpus, "model": model_dir, "run": run_dir}


def _damaged_copy(model_dir: Path, target: Path, damage: str) -> Path:
    """Copy a model folder and damage one tensor of its weights: "int32" or "nan"."""
    shutil.copytree(model_dir, target)
    weights = load_file(str(target / WEIGHTS_NAME))
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "int32":
        weights[name] = weights[name].round().to(torch.int32)
    else:
        weights[name] = weights[name].clone()
        weights[name][0, 0] = math.nan
    save_file(weights, str(target / WEIGHTS_NAME), metadata={"format": "pt"})
    return target


def _perplexity(stdout: str) -> str:
    return stdout.split("perplexity")[1].split("|")[0].strip()


# --- eval: which text it reads --------------------------------------------------------------------------


def test_eval_reads_run_training_data(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, recorded, _ = _run(["eval", "--model", str(workspace["run"]), *EVAL], capsys)
    assert code == 0
    assert "the run's training data" in recorded
    assert str(workspace["corpus"]) in recorded

    code, explicit, _ = _run(
        ["eval", "--model", str(workspace["run"]), "--data", str(workspace["corpus"]), *EVAL], capsys
    )
    assert code == 0
    assert _perplexity(recorded) == _perplexity(explicit)


def test_eval_missing_run_data_error(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = _write_corpus(tmp_path / "moved")
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    record["data"]["sources"] = [str(corpus)]
    (run_dir / "run.json").write_text(json.dumps(record))
    shutil.rmtree(corpus)

    line = _error(["eval", "--model", str(run_dir), *EVAL], capsys)
    assert str(run_dir / "run.json") in line
    assert "--data" in line


def test_eval_damaged_run_json_names_file(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    (run_dir / "run.json").write_text("{not json")

    line = _error(["eval", "--model", str(run_dir), *EVAL], capsys)
    assert str(run_dir / "run.json") in line


def test_eval_uses_tokenizer_flag(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", str(workspace["model"]), "--data", str(workspace["corpus"]), *EVAL]
    code, own, _ = _run(args, capsys)
    assert code == 0
    code, explicit_own, _ = _run([*args, "--tokenizer", str(workspace["model"])], capsys)
    assert code == 0
    assert explicit_own == own

    other = train_tokenizer(
        [Document(f"doc{i}", " ".join(VERSES) * (i + 1)) for i in range(4)], vocab_size=280
    )
    other.save_pretrained(str(tmp_path / "other"))
    code, with_other, _ = _run([*args, "--tokenizer", str(tmp_path / "other")], capsys)
    assert code == 0
    assert with_other.splitlines()[-1] != own.splitlines()[-1]

    line = _error([*args, "--tokenizer", str(tmp_path / "absent")], capsys)
    assert str(tmp_path / "absent") in line


def test_eval_rejects_oversized_tokenizer(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "small_vocab"
    save_model_folder(DecoderLM(tiny_config("delta", vocab_size=256)), folder)
    args = ["eval", "--model", str(folder), "--data", str(workspace["corpus"]), *EVAL]

    line = _error([*args, "--tokenizer", str(workspace["model"])], capsys)
    assert "--tokenizer" in line
    assert "300 tokens" in line


# --- eval and routing: window and batch settings ------------------------------------------------------


BAD_WINDOW_SETTINGS = [
    (["--seq-len", "0"], "--seq-len 0 is invalid: expected 1 to 64 tokens"),
    (["--seq-len", "-3"], "--seq-len -3 is invalid"),
    (["--seq-len", str(CONTEXT + 1)], f"--seq-len {CONTEXT + 1} is invalid: expected 1 to 64 tokens"),
    (["--batch-size", "0"], "--batch-size 0 is invalid: expected a positive integer"),
    (["--batch-size", "-2"], "--batch-size -2 is invalid"),
    (["--max-windows", "-1"], "--max-windows -1 is invalid"),
    (["--val-fraction", "0"], "--val-fraction 0.0 is invalid"),
    (["--val-fraction", "2"], "--val-fraction 2.0 is invalid"),
    (["--max-documents", "0"], "--max-documents 0 is invalid"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_WINDOW_SETTINGS)
def test_eval_rejects_bad_window_settings(
    workspace: dict[str, Path], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(["eval", "--model", str(workspace["run"]), *extra], capsys)
    assert message in line


@pytest.mark.parametrize(("extra", "message"), BAD_WINDOW_SETTINGS)
def test_routing_rejects_bad_window_settings(
    workspace: dict[str, Path],
    tmp_path: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "routing"
    line = _error(["routing", "--model", str(workspace["run"]), *extra, "--out", str(out)], capsys)
    assert message in line
    assert not out.exists()


def test_routing_max_documents_replaces_run_cap(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "routing"
    args = ["routing", "--model", str(workspace["run"]), "--split", "all", "--max-documents", "3"]
    code, _, stderr = _run([*args, "--seq-len", "16", "--max-windows", "2", "--out", str(out)], capsys)
    assert code == 0, stderr
    (model,) = json.loads((out / "routing.json").read_text())["models"]
    assert model["text"]["documents"] == 3


# --- weights that are not usable ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["int32", "nan"])
def test_damaged_weights_are_rejected_when_loading(
    workspace: dict[str, Path], tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _damaged_copy(workspace["model"], tmp_path / damage, damage)
    corpus = str(workspace["corpus"])
    commands = [
        ["eval", "--model", str(folder), "--data", corpus, *EVAL],
        ["generate", "--model", str(folder), "--prompt", "Shall I", "--max-new-tokens", "3", "--do-sample"],
        [
            "routing",
            "--model",
            str(folder),
            "--data",
            corpus,
            "--max-windows",
            "2",
            "--out",
            str(tmp_path / "r"),
        ],
    ]
    for args in commands:
        line = _error(args, capsys)
        assert str(folder / WEIGHTS_NAME) in line, args[0]
        assert "model.layers.1.mlp.up_proj.weight" in line, args[0]
        assert ("I32" if damage == "int32" else "NaN") in line, args[0]
    assert not (tmp_path / "r").exists()


def test_effective_rank_of_degenerate_matrices() -> None:
    matrices = torch.randn(3, 4, 8)
    matrices[1, 2, 5] = math.nan
    matrices[2] = 0.0

    ranks = effective_rank(matrices)

    assert 1.0 <= ranks[0].item() <= 4.0
    assert math.isnan(ranks[1].item())
    assert ranks[2].item() == pytest.approx(1.0)


# --- sizes too large for memory -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["--batch-size", "--vocab-size", "--num-layers", "--hidden-size", "--intermediate-size"]
)
def test_train_rejects_sizes_beyond_memory(
    tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    line = _error([*TINY_TRAIN, flag, "1000000000", "--out", str(out)], capsys)
    assert "training needs at least" in line
    assert "GB of memory" in line
    assert flag in line
    assert not out.exists()


def test_config_huge_layer_count_rejected(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(workspace["model"], folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["num_hidden_layers"] = 1_000_000_000
    (folder / CONFIG_NAME).write_text(json.dumps(config))

    line = _error(["eval", "--model", str(folder), "--data", str(workspace["corpus"]), *EVAL], capsys)
    assert "1,000,000,000 layers" in line
    assert "4 layers" in line
    line = _error(["generate", "--model", str(folder), "--prompt", "Shall I"], capsys)
    assert "1,000,000,000 layers" in line


def test_eval_rejects_batch_beyond_memory(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", str(workspace["run"]), "--seq-len", "64", "--batch-size", "1000000000"]
    line = _error(args, capsys)
    assert "needs at least" in line
    assert "--batch-size" in line


def test_base_parameter_count_matches_model() -> None:
    configs = [
        tiny_config("delta"),
        tiny_config("standard", tie_embeddings=False),
        tiny_config("attnres_block", qk_norm=True, attention_bias=True, head_dim=16),
        ModelConfig(
            vocab_size=100,
            hidden_size=48,
            num_layers=3,
            num_heads=6,
            num_kv_heads=3,
            intermediate_size=80,
            residual=ResidualConfig(scheme="delta_cumulative"),
        ),
    ]
    for config in configs:
        assert config.base_parameter_count() == DecoderLM(config).parameter_counts()["base"], config


# --- seeds, learning rates and other training flags ---------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", str(MAX_SEED + 1)], "(--seed) is invalid"),
        (["--seed", "99999999999999999999999"], "(--seed) is invalid"),
        (["--seed", "-1"], "(--seed) is invalid"),
        (["--lr", "inf"], "train.lr = inf (--lr) is invalid"),
        (["--lr", "nan"], "train.lr = nan (--lr) is invalid"),
        (["--routing-lr", "inf"], "train.routing_lr = inf (--routing-lr) is invalid"),
        (["--weight-decay", "inf"], "train.weight_decay = inf (--weight-decay) is invalid"),
        (["--weight-decay", "1e309"], "train.weight_decay = inf (--weight-decay) is invalid"),
    ],
)
def test_train_rejects_bad_optimizer_settings(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    line = _error([*TINY_TRAIN, *extra, "--out", str(out)], capsys)
    assert message in line
    assert not out.exists()


def test_compare_rejects_huge_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare"
    args = ["compare", "--preset", "tiny", "--no-progress", "--schemes", "standard,delta"]
    line = _error([*args, "--seeds", str(MAX_SEED + 1), "--out", str(out)], capsys)
    assert "--seeds" in line
    assert not out.exists()


@pytest.mark.parametrize("seed", [str(MAX_SEED + 1), "-1"])
def test_generate_rejects_bad_seed(
    workspace: dict[str, Path], seed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(
        ["generate", "--model", str(workspace["model"]), "--prompt", "Shall I", "--seed", seed], capsys
    )
    assert "(--seed) is invalid" in line


def test_generate_rejects_prompt_that_is_not_utf8(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Python passes the Latin-1 bytes of "café" on the command line as "caf" plus a lone surrogate.
    prompt = b"caf\xe9".decode("utf-8", errors="surrogateescape")
    line = _error(["generate", "--model", str(workspace["model"]), "--prompt", prompt], capsys)
    assert "--prompt is not valid UTF-8" in line
    assert "0xe9" in line


def test_warmup_longer_than_run_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The warning comes from the flags alone, so an invalid --seed ends the command before training.
    args = [*TINY_TRAIN, "--warmup-steps", "3", "--seed", "-1", "--out", str(tmp_path / "run")]
    code, _, stderr = _run(args, capsys)
    assert code == 2
    assert "warning: --warmup-steps 3 exceeds the 2 training steps" in stderr

    code, _, stderr = _run(
        [*TINY_TRAIN, "--warmup-steps", "2", "--seed", "-1", "--out", str(tmp_path / "run")], capsys
    )
    assert "warning" not in stderr


def test_config_error_prefix_is_origin() -> None:
    values: dict[str, Any] = {
        "model_type": "delta_attnres",
        "vocab_size": -5,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    with pytest.raises(ValueError, match=r"^model\.vocab_size = -5 \(--vocab-size\) is invalid"):
        model_config_from_hf_dict(values)
    with pytest.raises(ValueError, match=r"^folder/config\.json: model\.vocab_size = -5 \(--vocab-size\) is invalid"):
        model_config_from_hf_dict(values, origin="folder/config.json")


def test_read_model_config_names_path_once(tmp_path: Path) -> None:
    values = {
        "model_type": "delta_attnres",
        "vocab_size": -5,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    (tmp_path / "config.json").write_text(json.dumps(values), encoding="utf-8")

    with pytest.raises(StorageError) as raised:
        read_model_config(tmp_path)

    message = str(raised.value)
    assert message.count("config.json") == 1, message
    assert "model.vocab_size = -5 (--vocab-size) is invalid" in message


# --- split settings, devices and damaged run.json ------------------------------------------------------


def test_eval_rejects_val_fraction_of_run(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(["eval", "--model", str(workspace["run"]), "--val-fraction", "0.5", *EVAL], capsys)
    assert "--val-fraction 0.5" in line
    assert str(workspace["run"] / "run.json") in line

    code, stdout, stderr = _run(
        ["eval", "--model", str(workspace["run"]), "--val-fraction", "0.1", *EVAL], capsys
    )
    assert code == 0, stderr
    assert "evaluating on the validation documents of" in stdout


def test_routing_rejects_val_fraction_of_run(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "routing"
    args = ["routing", "--model", str(workspace["run"]), "--val-fraction", "0.5", "--out", str(out)]
    line = _error([*args, "--device", "cpu"], capsys)
    assert "--val-fraction 0.5" in line
    assert not (out / "routing.json").exists()


def test_eval_val_fraction_applies_to_model_folder(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", str(workspace["model"]), "--data", str(workspace["corpus"]), *EVAL]
    code, default, _ = _run(args, capsys)
    assert code == 0
    code, half, _ = _run([*args, "--val-fraction", "0.5"], capsys)
    assert code == 0
    assert _perplexity(default) != _perplexity(half)


def test_eval_split_all_message(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = _run(["eval", "--model", str(workspace["run"]), "--split", "all", *EVAL], capsys)
    assert code == 0, stderr
    assert "evaluating on all documents of" in stdout


@pytest.mark.parametrize("device", ["meta", "cuda:x", "mps", "cpu:0", ""])
def test_commands_reject_invalid_device(
    workspace: dict[str, Path], tmp_path: Path, device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(workspace["model"])
    commands = [
        [*TINY_TRAIN, "--out", str(tmp_path / "train")],
        ["compare", "--preset", "tiny", "--schemes", "standard", "--out", str(tmp_path / "compare")],
        ["eval", "--model", model, "--seq-len", "16"],
        ["routing", "--model", model, "--out", str(tmp_path / "routing")],
        ["generate", "--model", model, "--prompt", "hi"],
    ]
    for command in commands:
        line = _error([*command, "--device", device], capsys)
        assert f"--device {device!r} is invalid" in line, command
    assert list(tmp_path.iterdir()) == []


DAMAGED_RUN_RECORDS = [
    ({"data": 5}, "field data is 5"),
    ({"data": {"sources": "d1"}}, "field data.sources is 'd1'"),
    ({"data": {"sources": [5]}}, "field data.sources is [5]"),
    ({"data": {"val_fraction": "x"}}, "field data.val_fraction is 'x'"),
    ({"train": {"seq_len": -1}}, "field train.seq_len is -1"),
    ([1, 2], "does not contain a JSON object"),
]


@pytest.mark.parametrize(("record", "message"), DAMAGED_RUN_RECORDS)
def test_eval_damaged_run_json_fields(
    workspace: dict[str, Path],
    tmp_path: Path,
    record: Any,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    (run_dir / "run.json").write_text(json.dumps(record))

    line = _error(["eval", "--model", str(run_dir), *EVAL], capsys)
    assert str(run_dir / "run.json") in line
    assert message in line
    assert "--data" in line


@pytest.mark.parametrize("text", ["{not json", '{"data": {"sources": "d1"}}'])
def test_eval_data_flag_skips_damaged_run_json(
    workspace: dict[str, Path],
    tmp_path: Path,
    text: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(workspace["run"], run_dir)
    (run_dir / "run.json").write_text(text)
    args = ["--data", str(workspace["corpus"]), *EVAL]

    code, damaged, stderr = _run(["eval", "--model", str(run_dir), *args], capsys)
    assert code == 0, stderr
    assert str(run_dir / "run.json") in caplog.text
    assert "--val-fraction" in caplog.text
    code, intact, _ = _run(["eval", "--model", str(workspace["run"]), *args], capsys)
    assert code == 0
    assert _perplexity(damaged) == _perplexity(intact)  # the run's split is the default one


def test_cache_variable_pointing_at_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "afile"
    cache.write_text("not a folder")
    corpus = _write_corpus(tmp_path / "corpus")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DELTA_ATTNRES_CACHE", str(cache))
        line = _error([*TINY_TRAIN, "--data", str(corpus), "--out", str(tmp_path / "run")], capsys)
    assert f"DELTA_ATTNRES_CACHE={cache} is not a folder" in line


def test_train_tokenizer_cache_under_file(tmp_path: Path) -> None:
    cache = tmp_path / "afile"
    cache.write_text("not a folder")
    documents = [Document("a", VERSES[0] * 4), Document("b", VERSES[1] * 4)]
    with pytest.raises(DataError, match="cannot create the tokenizer cache folder"):
        train_tokenizer(documents, 300, cache_dir=cache / "tokenizers")


def test_small_vocab_message_counts_ids() -> None:
    with pytest.raises(DataError, match="take 257 ids and BPE needs room for at least 3 merged tokens"):
        train_tokenizer([Document("a", VERSES[0])], 257)


def test_hidden_size_not_divisible_names_flags() -> None:
    with pytest.raises(ValueError, match="pass a --hidden-size divisible by --num-heads"):
        ModelConfig(hidden_size=63, num_heads=4, num_kv_heads=4)


def test_eval_max_documents_too_few_names_flag(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", str(workspace["run"]), "--max-documents", "1", *EVAL]
    line = _error(args, capsys)
    assert "--max-documents 1 keeps only 1" in line


def bare_model_folder(model_dir: Path, folder: Path) -> Path:
    """Copy the config and weights of `model_dir`, but not its tokenizer, into a new `folder`."""
    folder.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy(model_dir / name, folder / name)
    return folder


def test_model_folder_without_tokenizer(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = bare_model_folder(workspace["model"], tmp_path / "bare")

    commands = [
        ["generate", "--model", str(folder), "--prompt", "hi", "--device", "cpu"],
        [*TINY_TRAIN, "--init-from", str(folder), "--out", str(tmp_path / "run")],
    ]
    for command in commands:
        line = _error(command, capsys)
        assert f"folder {folder} contains no loadable tokenizer, because it has none of" in line, command
        assert "copy the tokenizer files" in line, command
        assert "one of: )" not in line, command


def test_tokenizer_config_without_tokenizer_json(workspace: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "half"
    shutil.copytree(workspace["model"], folder)
    (folder / "tokenizer.json").unlink()

    with pytest.raises(DataError) as raised:
        load_tokenizer(folder)
    assert "contains no loadable tokenizer;" in str(raised.value)
    assert "one of:" not in str(raised.value)


def test_train_max_documents_too_few_names_flag(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--no-progress", "--steps", "1", "--max-documents", "1"]
    line = _error([*args, "--data", str(workspace["corpus"]), "--out", str(out)], capsys)
    assert "--max-documents 1 keeps only 1" in line


def test_init_from_folder_without_tokenizer_takes_flag(workspace: dict[str, Path], tmp_path: Path) -> None:
    folder = bare_model_folder(workspace["model"], tmp_path / "bare")
    out = tmp_path / "run"
    args = ["--init-from", str(folder), "--tokenizer", str(workspace["model"]), "--seq-len", "16"]

    status = main([*TINY_TRAIN, *args, "--data", str(workspace["corpus"]), "--out", str(out)])

    assert status == 0
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["data"]["tokenizer"] == str(workspace["model"])
    assert (out / "model" / "tokenizer.json").is_file()


def test_init_from_folder_with_tokenizer_rejects_flag(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other_tokenizer"
    shutil.copytree(workspace["model"], other)
    args = ["--init-from", str(workspace["model"]), "--tokenizer", str(other), "--out", str(tmp_path / "run")]

    line = _error([*TINY_TRAIN, *args], capsys)

    assert "uses the tokenizer stored in the folder" in line
    assert "accepted only for a model folder without a tokenizer" in line


def test_generate_tokenizer_flag_for_bare_folder(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = bare_model_folder(workspace["model"], tmp_path / "bare")
    args = ["generate", "--model", str(folder), "--prompt", "Shall I", "--max-new-tokens", "3"]

    status = main([*args, "--tokenizer", str(workspace["model"])])

    assert status == 0
    assert capsys.readouterr().out.startswith("Shall I")


def test_generate_rejects_oversized_tokenizer(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "small_vocab"
    save_model_folder(DecoderLM(tiny_config("delta", vocab_size=256)), folder)
    args = ["generate", "--model", str(folder), "--prompt", "Shall I", "--tokenizer", str(workspace["model"])]

    line = _error(args, capsys)

    assert f"--tokenizer {workspace['model']} has 300 tokens" in line
    assert "the model's vocabulary has 256" in line
