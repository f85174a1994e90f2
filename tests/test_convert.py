"""Conversion of tiny random Llama, Qwen2 and Qwen3 checkpoints, compared with the transformers models.

Every source model has random RMSNorm gains (including Qwen3's QK-norms) and random biases, so a weight
that is dropped or misplaced changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import TEXT, tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from delta_attnres.cli import main
from delta_attnres.convert import ConversionError, convert_checkpoint
from delta_attnres.hf import load_hf_model
from delta_attnres.storage import load_model_folder, read_model_config

EXACT_SCHEMES = ("standard", "delta", "delta_block", "delta_cumulative")
LOGIT_TOLERANCE = 1e-5
COMMON: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=96,
)


def build_source(kind: str, **changes: Any) -> torch.nn.Module:
    """Return a random transformers model of `kind` with random norm gains and biases."""
    torch.manual_seed(0)
    values = {**COMMON, **changes}
    model: torch.nn.Module
    if kind == "llama_tied":
        model = LlamaForCausalLM(LlamaConfig(**values, tie_word_embeddings=True, rope_parameters=_rope(5e5)))
    elif kind == "llama_untied":
        model = LlamaForCausalLM(LlamaConfig(**values, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**values, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**{"head_dim": 12, **values}, tie_word_embeddings=False))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


def save_source(model: Any, folder: Path, tokenizer: Any | None = None, **save_options: Any) -> Path:
    model.save_pretrained(folder, **save_options)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama_tied", "llama_untied", "qwen2", "qwen3"])
def source(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer
) -> tuple[Any, Path]:  # type: ignore[no-untyped-def]
    model = build_source(request.param)
    folder = save_source(model, tmp_path_factory.mktemp(request.param) / "source", tokenizer)
    return model, folder


def probe(length: int = 24, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 320, (3, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def source_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.mark.parametrize("scheme", EXACT_SCHEMES)
def test_exact_schemes_match_source(
    source: tuple[Any, Path], scheme: str, tmp_path: Path, tokenizer: Any
) -> None:
    model, folder = source
    result = convert_checkpoint(folder, scheme, tmp_path / "out", num_blocks=2, log=lambda line: None)
    assert result.max_logit_diff <= LOGIT_TOLERANCE

    ids = probe()
    expected = source_logits(model, ids)
    converted = load_model_folder(tmp_path / "out")
    with torch.no_grad():
        assert (converted(ids) - expected).abs().max().item() <= LOGIT_TOLERANCE
        hf_converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert (hf_converted(input_ids=ids).logits - expected).abs().max().item() <= LOGIT_TOLERANCE
    assert converted.config.residual.gate == (scheme != "standard")
    assert len(tokenizer) == len(load_hf_tokenizer(tmp_path / "out"))


def load_hf_tokenizer(folder: Path) -> Any:
    from delta_attnres.data import load_tokenizer

    return load_tokenizer(folder)


def test_config_fields_are_mapped(tmp_path: Path) -> None:
    folder = save_source(
        build_source("qwen3", rms_norm_eps=1e-5, max_position_embeddings=80), tmp_path / "src"
    )
    convert_checkpoint(folder, "delta", tmp_path / "out", log=lambda line: None)
    config = read_model_config(tmp_path / "out")
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (32, 4, 4, 2)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (12, 64, 320)
    assert (config.rms_norm_eps, config.max_seq_len, config.rope_theta) == (1e-5, 80, 10000.0)
    assert config.qk_norm
    assert not config.attention_bias
    assert not config.tie_embeddings

    llama = save_source(build_source("llama_tied"), tmp_path / "llama")
    convert_checkpoint(llama, "standard", tmp_path / "llama_out", log=lambda line: None)
    config = read_model_config(tmp_path / "llama_out")
    assert config.rope_theta == 5e5
    assert config.tie_embeddings
    assert not config.qk_norm

    qwen2 = save_source(build_source("qwen2"), tmp_path / "qwen2")
    convert_checkpoint(qwen2, "standard", tmp_path / "qwen2_out", log=lambda line: None)
    assert read_model_config(tmp_path / "qwen2_out").attention_bias


def test_untied_head_is_kept(tmp_path: Path) -> None:
    model = build_source("llama_untied")
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    folder = save_source(model, tmp_path / "src")
    convert_checkpoint(folder, "delta", tmp_path / "out", log=lambda line: None)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight)


def test_qk_norm_weights_are_kept(tmp_path: Path) -> None:
    model = build_source("qwen3")
    q_norm = model.model.layers[2].self_attn.q_norm.weight
    assert not torch.equal(q_norm, torch.ones_like(q_norm))
    folder = save_source(model, tmp_path / "src")
    convert_checkpoint(folder, "delta_block", tmp_path / "out", num_blocks=2, log=lambda line: None)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(state["model.layers.2.self_attn.q_norm.weight"], q_norm)
    assert torch.equal(
        state["model.layers.2.self_attn.k_norm.weight"], model.model.layers[2].self_attn.k_norm.weight
    )


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_gates_are_exact_whatever_the_eps(eps: float, tmp_path: Path) -> None:
    model = build_source("llama_untied", rms_norm_eps=eps)
    folder = save_source(model, tmp_path / "src")
    for scheme in ("delta", "delta_block"):
        convert_checkpoint(folder, scheme, tmp_path / scheme, num_blocks=2, log=lambda line: None)
        ids = probe()
        with torch.no_grad():
            difference = (load_model_folder(tmp_path / scheme)(ids) - source_logits(model, ids)).abs().max()
        assert difference.item() <= LOGIT_TOLERANCE


def test_replacement_schemes_match_up_to_eps(tmp_path: Path) -> None:
    # x = h / n makes each pre-norm use an effective eps of n^2 * eps: the difference shrinks with eps.
    differences = {}
    for eps in (1e-2, 1e-6, 1e-12):
        folder = save_source(build_source("qwen3", rms_norm_eps=eps), tmp_path / f"src{eps}")
        for scheme in ("attnres_full", "attnres_block"):
            result = convert_checkpoint(
                folder,
                scheme,
                tmp_path / f"{scheme}{eps}",
                num_blocks=2,
                tolerance=100.0,
                log=lambda line: None,
            )
            differences[scheme, eps] = result.max_logit_diff
    for scheme in ("attnres_full", "attnres_block"):
        assert differences[scheme, 1e-2] > differences[scheme, 1e-6] > differences[scheme, 1e-12]
        assert differences[scheme, 1e-12] <= 1e-4
        assert differences[scheme, 1e-2] > 1e-3


def test_replacement_scheme_needs_tolerance(source: tuple[Any, Path], tmp_path: Path) -> None:
    _, folder = source
    with pytest.raises(ConversionError, match="pass --tolerance"):
        convert_checkpoint(folder, "attnres_full", tmp_path / "out", log=lambda line: None)
    with pytest.raises(ConversionError, match="attnres_cumulative cannot start from a pretrained model"):
        convert_checkpoint(
            folder, "attnres_cumulative", tmp_path / "out", tolerance=1.0, log=lambda line: None
        )
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint(tmp_path: Path) -> None:
    model = build_source("qwen2")
    folder = save_source(model, tmp_path / "src", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert not (folder / "model.safetensors").exists()
    convert_checkpoint(folder, "delta", tmp_path / "out", log=lambda line: None)
    ids = probe()
    with torch.no_grad():
        difference = (load_model_folder(tmp_path / "out")(ids) - source_logits(model, ids)).abs().max()
    assert difference.item() <= LOGIT_TOLERANCE


def test_convert_command_prints_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "src")
    out = tmp_path / "out"
    assert (
        main(
            [
                "convert",
                "--from",
                str(folder),
                "--scheme",
                "delta_block",
                "--num-blocks",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "llama -> delta_block: max |logit difference| 0 on a 2x32 probe batch" in printed
    assert (out / "config.json").is_file()

    assert main(["convert", "--from", str(folder), "--scheme", "delta", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_convert_command_rejects_difference_above_tolerance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "src")
    out = tmp_path / "out"
    args = [
        "convert",
        "--from",
        str(folder),
        "--scheme",
        "attnres_full",
        "--tolerance",
        "1e-9",
        "--out",
        str(out),
    ]
    capsys.readouterr()  # drop the progress bars of save_pretrained
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "max |logit difference|" in captured.out
    assert captured.err.startswith("delta-attnres convert: error: the converted model's logits differ")
    assert "nothing was written" in captured.err
    assert not out.exists()
    assert [path.name for path in tmp_path.iterdir()] == ["src"]


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        ("llama_tied", {"model_type": "gpt2"}, "supported architectures: llama, qwen2, qwen3"),
        (
            "llama_tied",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
            "RoPE scaling type 'llama3' is not supported",
        ),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
            "sliding-window attention",
        ),
        ("llama_tied", {"attention_bias": True}, "o_proj bias"),
        ("llama_tied", {"mlp_bias": True}, "mlp_bias=True is not supported"),
        ("llama_tied", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ],
)
def test_unsupported_options_rejected(
    kind: str, changes: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_source(build_source(kind), tmp_path / "src")
    edit_config(folder, **changes)
    capsys.readouterr()  # drop the progress bars of save_pretrained
    assert main(["convert", "--from", str(folder), "--scheme", "delta", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error
    assert error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def rewrite_weights(folder: Path, edit: Any) -> None:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda state: state.pop("model.layers.3.mlp.down_proj.weight"),
            r"missing \['model.layers.3.mlp.down_proj",
        ),
        (
            lambda state: state.update({"model.layers.0.extra": torch.zeros(3)}),
            r"unexpected \['model.layers.0.extra",
        ),
        (
            lambda state: state.update({"model.norm.weight": torch.ones(33)}),
            r"model.norm.weight has shape \(33,\), the config expects \(32,\)",
        ),
    ],
)
def test_bad_tensors_rejected(edit: Any, message: str, tmp_path: Path) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "src")
    rewrite_weights(folder, edit)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(folder, "delta", tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_vocab_rejected(tmp_path: Path, tokenizer: Any) -> None:
    folder = save_source(build_source("llama_tied", vocab_size=256), tmp_path / "src", tokenizer)
    with pytest.raises(ConversionError, match="has 300 tokens but the model's vocab_size is 256"):
        convert_checkpoint(folder, "delta", tmp_path / "out", log=lambda line: None)


def test_folder_without_config_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConversionError, match=r"not a Hugging Face checkpoint folder: it has no config\.json"
    ):
        convert_checkpoint(tmp_path / "empty", "delta", tmp_path / "out", log=lambda line: None)
    with pytest.raises(ConversionError, match="does not exist"):
        convert_checkpoint(tmp_path / "absent", "delta", tmp_path / "out", log=lambda line: None)


def test_pickled_checkpoint_rejected(tmp_path: Path) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "src")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="pickled weights"):
        convert_checkpoint(folder, "delta", tmp_path / "out", log=lambda line: None)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    root = tmp_path_factory.mktemp("init_from")
    folder = save_source(build_source("qwen3"), root / "src", tokenizer)
    convert_checkpoint(folder, "delta_block", root / "converted", num_blocks=2, log=lambda line: None)
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(4):
        (corpus / f"doc{index}.txt").write_text(TEXT * (20 + index))
    return root


def test_train_init_from_keeps_architecture_and_tokenizer(
    converted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = converted / "run"
    args = [
        "train", "--preset", "tiny", "--no-progress", "--init-from", str(converted / "converted"),
        "--data", str(converted / "corpus"), "--steps", "2", "--seq-len", "32", "--batch-size", "4",
        "--eval-interval", "2", "--lr", "5e-5", "--routing-lr", "5e-3", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["init_from"] == str(converted / "converted")
    assert read_model_config(out / "model") == read_model_config(converted / "converted")
    assert len(load_hf_tokenizer(out / "model")) == 300
    trained = load_hf_model(out / "model")
    start = load_hf_model(converted / "converted")
    # Two small steps move the weights a little from the converted checkpoint, not from a fresh init.
    change = (trained.model.embed_tokens.weight - start.model.embed_tokens.weight).abs().max().item()
    assert 0 < change < 1e-2
    gate = trained.model.layers[1].attn_router.gate
    assert gate is not None and gate.item() != 0.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--hidden-size", "64"], "hidden_size 64 (the folder has 32)"),
        (["--scheme", "delta"], "scheme 'delta' (the folder has 'delta_block')"),
        (["--tokenizer", "/some/other/tokenizer"], "drop --tokenizer"),
    ],
)
def test_train_init_from_rejects_conflicting_flags(
    converted: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--init-from", str(converted / "converted"), "--out", str(converted / "bad"), *extra]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("delta-attnres train: error: --init-from") or "drop --tokenizer" in error
    assert message in error
    assert not (converted / "bad").exists()


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    values = json.loads(path.read_text(encoding="utf-8"))
    values.update(changes)
    path.write_text(json.dumps(values), encoding="utf-8")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            dict(num_hidden_layers=10**9),
            "sets 1,000,000,000 layers, but the weights hold tensors of 4 layers",
        ),
        (dict(num_hidden_layers=2), "sets 2 layers, but the weights hold tensors of 4 layers"),
        (dict(num_hidden_layers="4"), "sets num_hidden_layers '4', which is invalid"),
        (
            dict(hidden_size=2**30, intermediate_size=2**30),
            r"needs at least .* of memory, but this machine has",
        ),
    ],
)
def test_config_disagreeing_with_weights_rejected(
    changes: dict[str, Any], message: str, tmp_path: Path
) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "src")
    _edit_config(folder, **changes)

    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(folder, "delta", tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("dtype", "code"), [(torch.int8, "I8"), (torch.int32, "I32"), (torch.bool, "BOOL")])
def test_integer_weights_rejected(dtype: torch.dtype, code: str, tmp_path: Path) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "src")
    name = "model.layers.0.mlp.down_proj.weight"

    def edit(state: dict[str, torch.Tensor]) -> None:
        state[name] = (state[name] * 100).to(dtype)

    rewrite_weights(folder, edit)

    with pytest.raises(ConversionError, match=rf"tensor {name} has dtype {code}, .*integer and quantized"):
        convert_checkpoint(folder, "delta", tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_named(value: float, tmp_path: Path) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "src")
    name = "model.layers.0.input_layernorm.weight"

    def edit(state: dict[str, torch.Tensor]) -> None:
        state[name][3] = value

    rewrite_weights(folder, edit)
    lines: list[str] = []

    with pytest.raises(ConversionError, match=rf"tensor {name} contains NaN or infinite values"):
        convert_checkpoint(folder, "delta", tmp_path / "out", log=lines.append)
    assert not any("logit difference" in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_convert_command_rejects_damaged_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "src")
    _edit_config(folder, num_hidden_layers=10**9)

    code = main(["convert", "--from", str(folder), "--scheme", "delta", "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err

    assert code == 2
    assert stderr.startswith("delta-attnres convert: error:")
    assert "sets 1,000,000,000 layers" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_source_without_tokenizer_logs_fix(tmp_path: Path) -> None:
    folder = save_source(build_source("llama_tied"), tmp_path / "source")
    lines: list[str] = []

    convert_checkpoint(folder, "delta", tmp_path / "out", log=lines.append)

    notes = [line for line in lines if "has no tokenizer" in line]
    assert len(notes) == 1, lines
    assert "copy the source model's tokenizer files into it" in notes[0]
    assert "--tokenizer to train --init-from" in notes[0]
