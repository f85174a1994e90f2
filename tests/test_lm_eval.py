"""The lm-evaluation-harness task for held-out perplexity, run on a model folder through remote code.

The end-to-end test needs `pip install lm-eval` and is slow: lm_eval takes about 20 s to import and
the task scores a whole play.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_helpers import tiny_model, tiny_tokenizer

from delta_attnres.lm_eval_tasks import TASKS_DIR
from delta_attnres.storage import save_model_folder

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="needs `pip install lm-eval`"
)


@pytest.mark.slow
@needs_lm_eval
def test_heldout_task_runs_through_remote_code(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_model_folder(tiny_model("delta_block", gate=True, max_seq_len=256), folder, tiny_tokenizer())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "m"))
    # Without delta_attnres imported, transformers can only load the model through the folder's own code.
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
        "--tasks", "delta_attnres_heldout", "--include_path", str(TASKS_DIR),
        "--limit", "1", "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "results"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = list((tmp_path / "results").rglob("results_*.json"))
    metrics = json.loads(results_file.read_text())["results"]["delta_attnres_heldout"]
    bits_per_byte = metrics["bits_per_byte,none"]
    assert math.isfinite(bits_per_byte)
    # An untrained model over a 300-token vocabulary: at most log2(300) bits per token, and a token
    # spans at least one byte.
    assert 0 < bits_per_byte < math.log2(300)


def test_heldout_documents_are_the_training_validation_split() -> None:
    from delta_attnres.data import load_documents, split_documents
    from delta_attnres.lm_eval_tasks.heldout import load_heldout

    dataset = load_heldout(val_fraction=0.1, split_seed=0, version=1.0)
    _, expected = split_documents(load_documents(None), 0.1, 0)
    assert dataset["validation"]["name"] == [document.name for document in expected]
