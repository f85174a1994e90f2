"""Model folders as Hugging Face folders: saving, loading through transformers, and bad folders."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from hf_helpers import run_python, tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

import delta_attnres
from delta_attnres.config import SCHEMES
from delta_attnres.hf import (
    DeltaAttnResConfig,
    DeltaAttnResForCausalLM,
    from_hf_model,
    load_hf_model,
    to_hf_model,
)
from delta_attnres.hf_format import AUTO_MAP, MODEL_TYPE
from delta_attnres.storage import (
    StorageError,
    check_model_folder,
    load_model_folder,
    read_model_config,
    save_model_folder,
)

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("hf") / "model"
    model = tiny_model("delta_block", gate=True)
    save_model_folder(model, path, tokenizer)
    # Logits are compared exactly, so every comparison runs without autograd, as this one does: with
    # autograd the routers use the fused kernel, which rounds differently from the inference path.
    with torch.no_grad():
        torch.save(model(IDS), path.parent / "expected_logits.pt")
    return path


def expected_logits(folder: Path) -> torch.Tensor:
    return torch.load(folder.parent / "expected_logits.pt")


def test_folder_has_hf_layout(folder: Path) -> None:
    names = {path.name for path in folder.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_delta_attnres.py",
        "modeling_delta_attnres.py",
    ):
        assert required in names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE
    assert config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["DeltaAttnResForCausalLM"]
    assert config["num_hidden_layers"] == 4
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["residual"]["scheme"] == "delta_block"
    assert config["eos_token_id"] == 0
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0


def test_every_relative_import_is_copied(folder: Path) -> None:
    from transformers.dynamic_module_utils import get_relative_import_files

    for module in ("modeling_delta_attnres.py", "configuration_delta_attnres.py"):
        for needed in get_relative_import_files(folder / module):
            assert Path(needed).is_file(), needed


def test_load_model_folder_matches(folder: Path) -> None:
    model = load_model_folder(folder)
    with torch.no_grad():
        assert torch.equal(model(IDS), expected_logits(folder))


def test_auto_model_loads_after_import(folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, DeltaAttnResConfig)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is DeltaAttnResForCausalLM
    assert model.model.layers[0].attn_router.gate is not None
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected_logits(folder))


def test_remote_code_loads_without_package(folder: Path, tmp_path: Path) -> None:
    # `sys.modules[...] = None` makes `import delta_attnres` fail, as if the package were not installed.
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["delta_attnres"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = {str(folder)!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        expected = torch.load({str(folder.parent / "expected_logits.pt")!r})
        ids = torch.tensor({IDS.tolist()!r})
        with torch.no_grad():
            print("max_diff", (model(ids).logits - expected).abs().max().item())
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        prompt = tokenizer("To be, or not", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        print("generated", out.shape[1] - prompt["input_ids"].shape[1])
        model.save_pretrained({str(tmp_path / "resaved")!r})
        """
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trust_remote_code" not in result.stdout  # no interactive question was asked
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    # The subprocess runs with more intra-op threads than the tests, so sums may round differently.
    assert float(lines["max_diff"]) <= 1e-5
    assert lines["generated"] == "4"
    resaved = load_model_folder(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.equal(resaved(IDS), expected_logits(folder))


def test_save_pretrained_round_trip(folder: Path, tmp_path: Path) -> None:
    model = load_hf_model(folder)
    model.save_pretrained(tmp_path / "saved")
    names = {path.name for path in (tmp_path / "saved").iterdir()}
    assert {"modeling_delta_attnres.py", "configuration_delta_attnres.py", "model.py"} <= names
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert read_model_config(tmp_path / "saved") == read_model_config(folder)
    reloaded = load_model_folder(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(IDS), expected_logits(folder))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_hf_wrapper_matches_decoder(scheme: str) -> None:
    model = tiny_model(scheme)
    hf_model = to_hf_model(model)
    with torch.no_grad():
        assert torch.equal(hf_model(IDS).logits, model(IDS))
        assert torch.equal(from_hf_model(hf_model)(IDS), model(IDS))


def test_untied_head_saved_and_loaded(tmp_path: Path) -> None:
    model = tiny_model("delta", tie_embeddings=False)
    save_model_folder(model, tmp_path / "untied")
    state = load_file(str(tmp_path / "untied" / "model.safetensors"))
    assert "lm_head.weight" in state
    hf_model = load_hf_model(tmp_path / "untied")
    assert hf_model.lm_head.weight.data_ptr() != hf_model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(hf_model(IDS).logits, model(IDS))


def test_lazy_package_attributes() -> None:
    assert delta_attnres.DeltaAttnResForCausalLM is DeltaAttnResForCausalLM
    assert delta_attnres.DeltaAttnResConfig is DeltaAttnResConfig
    with pytest.raises(AttributeError):
        _ = delta_attnres.NoSuchName  # type: ignore[attr-defined]


def test_legacy_config_layout_still_loads(folder: Path, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = read_model_config(folder)
    (legacy / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, **config.to_dict()}))
    (legacy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert read_model_config(legacy) == config
    with torch.no_grad():
        assert torch.equal(load_model_folder(legacy)(IDS), expected_logits(folder))
        assert torch.equal(load_hf_model(legacy)(IDS).logits, expected_logits(folder))


def test_config_rejects_invalid_values() -> None:
    with pytest.raises(ValueError, match="scheme"):
        DeltaAttnResConfig(residual={"scheme": "nope"})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        DeltaAttnResConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="hidden_act"):
        DeltaAttnResConfig(hidden_act="gelu")


def _copy_folder(folder: Path, target: Path) -> Path:
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_missing_tensor_rejected(folder: Path, tmp_path: Path) -> None:
    broken = _copy_folder(folder, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(StorageError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        check_model_folder(broken)
    with pytest.raises(StorageError, match="up_proj"):
        load_model_folder(broken)
    with pytest.raises(StorageError, match="up_proj"):
        load_hf_model(broken)


def test_extra_tensor_rejected(folder: Path, tmp_path: Path) -> None:
    broken = _copy_folder(folder, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(StorageError, match=r"unexpected \['model.layers.9.extra.weight'\]"):
        check_model_folder(broken)


def test_misshaped_tensor_rejected(folder: Path, tmp_path: Path) -> None:
    broken = _copy_folder(folder, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(31)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(
        StorageError, match=r"model.norm.weight has shape \(31,\), the config expects \(32,\)"
    ):
        check_model_folder(broken)


def test_tokenizer_larger_than_vocab_rejected(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    small = tiny_model("delta", vocab_size=128)
    with pytest.raises(StorageError, match="the tokenizer has 300 tokens but the model's vocab_size is 128"):
        save_model_folder(small, tmp_path / "small", tokenizer)
    assert not (tmp_path / "small").exists()
    save_model_folder(small, tmp_path / "small")
    tokenizer.save_pretrained(str(tmp_path / "small"))
    with pytest.raises(StorageError, match="does not belong to this model"):
        check_model_folder(tmp_path / "small")


def test_pickled_weights_rejected(tmp_path: Path, folder: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(StorageError, match="pickled weights"):
        load_model_folder(pickled)


def test_damaged_config_rejected(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        read_model_config(damaged)
    (damaged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(StorageError, match="delta-attnres convert"):
        read_model_config(damaged)
