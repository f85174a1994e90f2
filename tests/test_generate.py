"""Cached decoding and `generate` for every scheme, and the `generate` command.

The tiny models have random router queries, gains and gates, so routing weights are far from uniform
and a cache bug in any scheme changes the logits.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hf_helpers import tiny_model, tiny_tokenizer
from transformers import DynamicCache

from delta_attnres.cli import main
from delta_attnres.config import SCHEMES
from delta_attnres.generate import FileStreamer, GenerationSettings, generate_text
from delta_attnres.hf import DeltaAttnResForCausalLM, to_hf_model
from delta_attnres.storage import save_model_folder

CACHE_TOLERANCE = 1e-5
NEW_TOKENS = 20
PAD_ID = 0


def hf_model(scheme: str) -> DeltaAttnResForCausalLM:
    gate = SCHEMES[scheme][1] == "additive"
    return to_hf_model(tiny_model(scheme, gate=gate), pad_token_id=PAD_ID, eos_token_id=None)


def prompt_ids(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 320, (1, length), generator=generator)


@pytest.fixture(params=list(SCHEMES))
def model(request: pytest.FixtureRequest) -> DeltaAttnResForCausalLM:
    return hf_model(request.param)


@torch.no_grad()
def test_cached_decoding_matches_uncached(model: DeltaAttnResForCausalLM) -> None:
    ids = prompt_ids(5, seed=1)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
    tokens = []
    for step in range(NEW_TOKENS):
        uncached = model(input_ids=ids, use_cache=False).logits[:, -1]
        difference = (logits - uncached).abs().max().item()
        assert difference <= CACHE_TOLERANCE, (
            f"step {step}: cached and uncached logits differ by {difference}"
        )
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token.item())
        ids = torch.cat([ids, token], dim=1)
        logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
    assert cache.get_seq_length() == 5 + NEW_TOKENS

    generated = model.generate(ids[:, :5], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert generated[0, 5:].tolist() == tokens


@torch.no_grad()
def test_two_chunk_prefill_matches_one(model: DeltaAttnResForCausalLM) -> None:
    ids = prompt_ids(7, seed=2)
    whole_cache = DynamicCache(config=model.config)
    whole = model(input_ids=ids, cache=whole_cache, use_cache=True).logits

    chunk_cache = DynamicCache(config=model.config)
    first = model(input_ids=ids[:, :4], cache=chunk_cache, use_cache=True).logits
    second = model(input_ids=ids[:, 4:], cache=chunk_cache, use_cache=True).logits
    assert (torch.cat([first, second], dim=1) - whole).abs().max().item() <= CACHE_TOLERANCE

    next_token = whole[:, -1:].argmax(-1)
    after_whole = model(input_ids=next_token, cache=whole_cache, use_cache=True).logits
    after_chunks = model(input_ids=next_token, cache=chunk_cache, use_cache=True).logits
    assert (after_whole - after_chunks).abs().max().item() <= CACHE_TOLERANCE


def generate_alone(model: DeltaAttnResForCausalLM, ids: torch.Tensor, new_tokens: int) -> list[int]:
    output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return output[0, ids.shape[1] :].tolist()


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(prompt.shape[1] for prompt in prompts)
    ids = torch.full((len(prompts), width), PAD_ID)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[1] :] = prompt[0]
        mask[row, width - prompt.shape[1] :] = 1
    return ids, mask


@torch.no_grad()
def test_left_padded_batch_matches_single_prompts(model: DeltaAttnResForCausalLM) -> None:
    prompts = [prompt_ids(length, seed=10 + length) for length in (3, 7, 5)]
    ids, mask = left_padded(prompts)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, prompt in enumerate(prompts):
        assert batch[row, ids.shape[1] :].tolist() == generate_alone(model, prompt, 8), f"row {row}"


@torch.no_grad()
def test_consecutive_generate_calls_do_not_leak_state() -> None:
    model = hf_model("delta_block")
    single = prompt_ids(6, seed=3)
    expected = generate_alone(model, single, 10)
    prompts = [prompt_ids(length, seed=20 + length) for length in (4, 6, 2)]
    ids, mask = left_padded(prompts)
    model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert generate_alone(model, single, 10) == expected
    model.generate(torch.cat([single, single]), max_new_tokens=3, do_sample=False)
    assert generate_alone(model, single, 10) == expected


@torch.no_grad()
def test_sampling_is_seeded_and_in_vocabulary() -> None:
    model = hf_model("delta")
    ids = prompt_ids(4, seed=4)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, max_new_tokens=12, do_sample=True, top_k=50, top_p=0.9).tolist())
    assert runs[0] == runs[1]
    assert all(0 <= token < model.config.vocab_size for token in runs[0][0])


def test_context_limit_rejected_in_forward() -> None:
    model = hf_model("delta")
    too_long = torch.ones((1, model.config.max_position_embeddings + 1), dtype=torch.long)
    with pytest.raises(ValueError, match="exceed the model's context of 64 tokens"):
        model(input_ids=too_long)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("generate") / "model"
    save_model_folder(tiny_model("delta_block", gate=True, init_std=0.02), folder, tiny_tokenizer())
    return folder


def test_streamer_prints_generated_text(text_folder: Path) -> None:
    stream = io.StringIO()
    settings = GenerationSettings(max_new_tokens=6)
    completion = generate_text(text_folder, "To be, or not", settings, stream=stream)
    assert stream.getvalue() == "To be, or not" + completion + "\n"
    assert FileStreamer.__mro__[1].__name__ == "TextStreamer"


def test_generate_command_prints_text(text_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(text_folder), "--prompt", "Now is the", "--max-new-tokens", "5"]
    assert main([*args, "--device", "cpu"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("Now is the")
    assert len(greedy) > len("Now is the\n")

    assert main([*args, "--do-sample", "--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Now is the")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "the " * 70], "but the model's context is 64 tokens"),
        (["--prompt", "Now", "--max-new-tokens", "64"], "shorten the prompt or lower --max-new-tokens"),
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "Now", "--chat"], "has no chat template"),
        (["--prompt", "Now", "--top-p", "0"], "top_p = 0.0 (--top-p) is invalid"),
    ],
)
def test_generate_command_rejects_bad_input(
    text_folder: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--model", str(text_folder), *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith("delta-attnres generate: error: ")
    assert message in error
    assert error.count("\n") == 1


def test_generate_command_rejects_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "Now"]) == 2
    assert "does not exist" in capsys.readouterr().err
