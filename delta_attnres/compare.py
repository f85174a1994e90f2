"""`compare`: train several residual schemes under identical conditions and report them side by side.

Every run uses the same text, tokenizer, seed, token budget and model size; only the residual scheme
differs. The output folder holds one run folder per scheme and seed under `runs/`, and:

    report.md                     results table, routing sharpness, figures
    report.json                   the same numbers, keyed by scheme name
    loss_curves.png               validation loss of every scheme against training tokens
    routing_max_weight.png        max routing weight (beside 1/n) and H / log n against sublayer depth
    routing_sources.png           adjacent-source cosine and effective rank against sublayer depth
    routing_heatmap_<scheme>.png  mean weight of every source at every routed sublayer, per scheme
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .analysis import RoutingTrace, trace_routing
from .checkpoint import (
    EXECUTION_SETTINGS,
    RecoveryAdvice,
    advise_recovery,
    classify_changes,
    list_changes,
    tokenizer_digest,
)
from .config import PUBLISHED_SCHEMES, SCHEMES
from .data import batch_at, eval_windows, load_tokenizer
from .distributed import init_parallel
from .metrics import read_metrics
from .plots import BY_DEPTH_PLOT, plot_loss_curves, plot_routing_figures
from .runconfig import MAX_SEED, DataConfig, RunConfig, run_config_from_preset
from .storage import load_model_folder, write_json_atomic, write_text_atomic
from .train import (
    CHECKPOINT_FILE,
    MODEL_DIR,
    RESULT_FILE,
    RUN_FILE,
    PreparedData,
    RunError,
    RunResult,
    main_rank_log,
    prepare_data,
    resolve_device,
    train_run,
)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PLOT = "loss_curves.png"
MAX_WEIGHT_PLOT = BY_DEPTH_PLOT
TOKENIZER_DIR = "tokenizer"
RUNS_DIR = "runs"
TRACE_WINDOWS = 8  # validation windows used for the routing statistics of each run
# A stopped run of a comparison goes on through `compare --resume`, which reuses the finished runs,
# continues a run from its checkpoint and trains a run without one from the start. --overwrite, which
# a lone train run needs in that last case, would discard the finished runs of the comparison.
COMPARE_ADVICE = RecoveryAdvice(
    resume="run the same compare command again with --resume",
    no_checkpoint="no checkpoint of this run was written yet",
    restart=(
        "run the same compare command again with --resume, which keeps the finished runs and trains "
        "this one from the start"
    ),
)


def parse_schemes(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(
            f"--schemes {text!r} names no scheme; expected a comma-separated list of {', '.join(SCHEMES)}"
        )
    for name in names:
        if name not in SCHEMES:
            raise ValueError(f"unknown scheme {name!r} in --schemes: expected one of {', '.join(SCHEMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--schemes {text!r} lists a scheme twice")
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(
            f"--seeds {text!r} is invalid: expected comma-separated integers such as 0,1,2"
        ) from error
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"--seeds {text!r} is invalid: expected distinct non-negative integers such as 0,1,2"
        )
    if max(seeds) > MAX_SEED:
        raise ValueError(f"--seeds {text!r} is invalid: each seed must be at most {MAX_SEED} (2**63 - 1)")
    return seeds


def check_compare_folder(out_dir: Path, overwrite: bool, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"output path {out_dir} exists and is not a folder; choose another --out")
    if resume and overwrite:
        raise RunError(
            "--resume keeps the runs in --out and --overwrite discards them; pass only one of them"
        )
    holds_results = (out_dir / REPORT_JSON).exists() or (out_dir / RUNS_DIR).exists()
    if not holds_results and out_dir.is_dir() and any(out_dir.iterdir()):
        raise RunError(
            f"{out_dir} is not empty and contains no comparison; compare writes its report, runs and "
            "tokenizer into --out, so choose a new or empty folder"
        )
    if holds_results and not (overwrite or resume):
        raise RunError(
            f"{out_dir} already holds a comparison; pass --resume to continue it or --overwrite to start again"
        )


def run_folder(out_dir: Path, scheme: str, seed: int) -> Path:
    """Return the folder of the run of `scheme` and `seed` in the comparison folder `out_dir`."""
    return out_dir / RUNS_DIR / f"{scheme}-seed{seed}"


def run_compare(
    out_dir: Path,
    schemes: Sequence[str] = PUBLISHED_SCHEMES,
    preset: str = "small",
    seeds: Sequence[int] = (0,),
    data: DataConfig | None = None,
    model_changes: dict[str, Any] | None = None,
    train_changes: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every scheme for every seed, then write the report files; return the report dict.

    With `resume`, finished runs are kept and an interrupted run continues from its checkpoint, but only
    when they trained with the requested settings (see check_reusable) and the comparison's tokenizer
    folder matches the requested data. Every model and metric is read from the run folders under
    `out_dir`, so a moved or copied comparison resumes from its own files. Under torchrun
    (train_changes["parallel"] ddp or fsdp) every rank trains each run, rank 0 alone writes the report,
    and the other ranks return an empty dict.
    """
    out_dir = Path(out_dir)
    base = run_config_from_preset(preset, model_changes, train_changes, data)
    context = init_parallel(base.train.parallel, resolve_device(base.train.device))
    check_compare_folder(out_dir, overwrite, resume)
    context.barrier()  # every rank checks the folder before rank 0 writes into it
    emit = main_rank_log(context, log)
    configs = {
        (scheme, seed): replace(
            base,
            model=base.model.replace(residual={"scheme": scheme}),
            train=replace(base.train, seed=seed),
        )
        for seed in seeds
        for scheme in schemes
    }
    run_dirs = {key: run_folder(out_dir, *key) for key in configs}
    if resume:  # before the data is prepared, so that changed settings fail fast
        for key, config in configs.items():
            check_reusable(config, run_dirs[key])
    emit(
        f"compare: {len(schemes)} schemes x {len(seeds)} seeds, preset {preset}, "
        f"{base.train.steps} steps x {base.train.batch_size * base.train.seq_len} tokens"
    )
    prepared = prepare_data(base.data, base.model.vocab_size, base.train.seq_len, log=emit)
    _keep_or_save_tokenizer(out_dir, prepared.tokenizer, resume, context.is_main)

    started = time.perf_counter()
    results: dict[tuple[str, int], RunResult] = {}
    for key, config in configs.items():
        results[key] = _train_or_reuse(config, run_dirs[key], prepared, overwrite, resume, progress, emit)
    emit(f"compare: all runs finished in {time.perf_counter() - started:.0f}s")
    if not context.is_main:
        return {}

    device = context.device
    traces = {key: _routing_trace(run_dirs[key], prepared, base, device) for key in results}
    report = build_report(base, schemes, seeds, results, traces, prepared)
    write_report(out_dir, report, traces, schemes, seeds)
    emit(f"compare: report written to {out_dir / REPORT_MD}")
    return report


def _is_finished(run_dir: Path) -> bool:
    return (run_dir / RESULT_FILE).exists() and (run_dir / MODEL_DIR).exists()


def check_reusable(config: RunConfig, run_dir: Path) -> None:
    """Raise RunError unless the run in `run_dir`, which --resume would keep, trained with `config`.

    --resume keeps a finished run (result.json and model/) and continues a checkpointed one; any other
    run starts again. Kept runs may differ from `config` only in checkpoint.EXECUTION_SETTINGS, which
    do not change what a run computes. This reads run.json; train_run checks a continued run against
    its checkpoint as well.
    """
    finished = _is_finished(run_dir)
    if not finished and not (run_dir / CHECKPOINT_FILE).exists():
        return
    run_file = run_dir / RUN_FILE
    fix = f"delete {run_dir} to train that run again, or pass --overwrite to train the comparison again"
    if not run_file.exists():
        if not finished:
            return
        raise RunError(
            f"--resume: {run_dir} contains a finished run but no {RUN_FILE}, so its settings cannot be "
            f"checked; {fix}"
        )
    values = _read_json(run_file, fix)
    try:
        if not isinstance(values, dict):
            raise ValueError(f"it contains {type(values).__name__}, not a JSON object")
        saved = RunConfig.from_dict(values)
    except (ValueError, TypeError, KeyError) as error:
        raise RunError(f"{run_file} is not a valid run config ({error}); {fix}") from error

    forbidden, _ = classify_changes(saved, config, EXECUTION_SETTINGS)
    if finished:
        steps = _read_result(run_dir).steps
        if steps != config.train.steps and not forbidden:  # a run.json that a resume did not update
            forbidden.append(f"steps in {RESULT_FILE} {steps!r} -> {config.train.steps!r}")
    if forbidden:
        raise RunError(
            f"--resume: {run_dir} was trained with other settings (run -> requested: "
            f"{list_changes(forbidden)}); repeat the settings in {run_file}, choose a new --out, or pass "
            "--overwrite to train the comparison again"
        )


def _read_json(path: Path, fix: str) -> Any:
    """Return the value of a JSON file; raise RunError naming the file and ending with `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RunError(f"cannot read {path}: {error.strerror or error}; {fix}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is damaged: it is not valid UTF-8 JSON ({error}); {fix}") from error


def _read_result(run_dir: Path) -> RunResult:
    """Read result.json of a finished run; its out_dir becomes `run_dir`, wherever the run was trained."""
    path = run_dir / RESULT_FILE
    if (run_dir / CHECKPOINT_FILE).exists():
        fix = (
            "delete it and pass --resume again to rebuild it from the run's checkpoint, or pass "
            "--overwrite to train the comparison again"
        )
    else:
        fix = f"delete {run_dir} to train that run again, or pass --overwrite to train the comparison again"
    try:
        result = RunResult.from_dict(_read_json(path, fix), str(path))
    except ValueError as error:
        raise RunError(f"{error}; {fix}") from error
    return replace(result, out_dir=str(run_dir))


def _keep_or_save_tokenizer(out_dir: Path, tokenizer: Any, resume: bool, is_main: bool) -> None:
    """Save the comparison's tokenizer folder; on resume, check an existing one instead of replacing it."""
    folder = out_dir / TOKENIZER_DIR
    if resume and folder.is_dir():
        saved = load_tokenizer(folder)
        if tokenizer_digest(saved) != tokenizer_digest(tokenizer):
            raise RunError(
                f"--resume: the tokenizer in {folder} (vocabulary {len(saved)}) differs from the one the "
                f"requested --data and --tokenizer give (vocabulary {len(tokenizer)}); repeat the data and "
                "tokenizer of the comparison, choose a new --out, or pass --overwrite to train the "
                "comparison again"
            )
        return
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(folder))


def _train_or_reuse(
    config: RunConfig,
    run_dir: Path,
    prepared: PreparedData,
    overwrite: bool,
    resume: bool,
    progress: bool,
    emit: Callable[[str], None],
) -> RunResult:
    label = f"{config.model.residual.scheme} seed {config.train.seed}"
    if resume and _is_finished(run_dir):
        emit(f"{label}: finished earlier, reusing {run_dir}")
        return _read_result(run_dir)
    continue_run = resume and (run_dir / CHECKPOINT_FILE).exists()
    with advise_recovery(COMPARE_ADVICE):
        return train_run(
            config,
            run_dir,
            data=prepared,
            overwrite=overwrite or (resume and not continue_run),
            resume=continue_run,
            progress=progress,
            log=emit,
            desc=label,
            resume_may_change=EXECUTION_SETTINGS,
        )


def _routing_trace(
    run_dir: Path, prepared: PreparedData, base: RunConfig, device: torch.device
) -> RoutingTrace:
    model = load_model_folder(run_dir / MODEL_DIR, device)
    starts = eval_windows(prepared.val, base.train.seq_len, TRACE_WINDOWS)
    batches = [
        batch_at(prepared.val, starts[i : i + 4], base.train.seq_len)[0] for i in range(0, len(starts), 4)
    ]
    return trace_routing(model, batches, device)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def build_report(
    base: RunConfig,
    schemes: Sequence[str],
    seeds: Sequence[int],
    results: dict[tuple[str, int], RunResult],
    traces: dict[tuple[str, int], RoutingTrace],
    prepared: PreparedData,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "delta_attnres_version": __version__,
        "torch_version": torch.__version__,
        "preset": base.preset,
        "seeds": list(seeds),
        "model": base.model.to_dict(),
        "train": base.to_dict()["train"],
        "data": prepared.description,
        "schemes": {},
    }
    for scheme in schemes:
        runs = [results[(scheme, seed)] for seed in seeds]
        entry: dict[str, Any] = {}
        for key in ("val_perplexity", "val_bits_per_byte", "val_loss", "wall_time_s"):
            mean, std = _mean_std([getattr(run, key) for run in runs])
            entry[key] = mean
            entry[f"{key}_std"] = std
        entry["params_base"] = runs[0].params_base
        entry["params_routing"] = runs[0].params_routing
        entry["tokens_seen"] = runs[0].tokens_seen
        # Run folders relative to the comparison folder, so that report.json stays true when it moves.
        entry["runs"] = [
            {**run.to_dict(), "out_dir": run_folder(Path(), scheme, run.seed).as_posix()} for run in runs
        ]
        trace = traces[(scheme, seeds[0])]
        entry["routing"] = {
            "seed": seeds[0],
            "deep": trace.deep_summary(),
            "sublayers": [
                {
                    "sublayer": row.sublayer,
                    "label": row.label,
                    "num_sources": row.num_sources,
                    "uniform_weight": row.uniform_weight,
                    "max_weight": row.max_weight,
                    "normalized_entropy": row.normalized_entropy,
                    "effective_sources": row.effective_sources,
                    "source_labels": row.source_labels,
                    "mean_weights": row.mean_weights,
                    "adjacent_cosine": row.adjacent_cosine,
                    "effective_rank": row.effective_rank,
                }
                for row in trace.sublayers
            ],
        }
        report["schemes"][scheme] = entry
    return report


def _fmt(mean: float, std: float, digits: int, multi: bool) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if multi else f"{mean:.{digits}f}"


def render_markdown(report: dict[str, Any], figures: dict[str, Any] | None = None) -> str:
    """Render report.md; `figures` are the routing figure names from `plot_routing_figures`."""
    multi = len(report["seeds"]) > 1
    model = report["model"]
    train = report["train"]
    lines = [
        "# Residual scheme comparison",
        "",
        f"Preset `{report['preset']}`: width {model['hidden_size']}, {model['num_layers']} layers, "
        f"{model['num_heads']} heads ({model['num_kv_heads']} key/value), vocabulary {model['vocab_size']}, "
        f"{model['residual']['num_blocks']} blocks for block schemes. Training: {train['steps']} steps of "
        f"{train['batch_size']} x {train['seq_len']} tokens, lr {train['lr']}, precision {train['precision']}, "
        f"seeds {', '.join(map(str, report['seeds']))}. Data: {report['data']}. "
        f"delta_attnres {report['delta_attnres_version']}, torch {report['torch_version']}.",
        "",
        "| scheme | val perplexity | val bits/byte | params (base) | params (routing) | tokens seen | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scheme, entry in report["schemes"].items():
        lines.append(
            f"| `{scheme}` | {_fmt(entry['val_perplexity'], entry['val_perplexity_std'], 2, multi)} | "
            f"{_fmt(entry['val_bits_per_byte'], entry['val_bits_per_byte_std'], 4, multi)} | "
            f"{entry['params_base']:,} | {entry['params_routing']:,} | {entry['tokens_seen']:,} | "
            f"{_fmt(entry['wall_time_s'], entry['wall_time_s_std'], 0, multi)} |"
        )
    if multi:
        lines += ["", "Values are mean ± sample standard deviation over the seeds."]
    lines += ["", "## Validation loss", "", f"![validation loss]({LOSS_PLOT})", ""]

    routed = {scheme: entry for scheme, entry in report["schemes"].items() if entry["routing"]["sublayers"]}
    if routed:
        lines += _render_routing(routed, figures or {})
    return "\n".join(lines) + "\n"


def _render_routing(routed: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    """Render the routing section: deep-layer sharpness beside 1/n, a by-sublayer table and the figures."""
    lines = [
        "## Routing sharpness",
        "",
        "Mean max routing weight and normalised entropy H / log n over validation tokens, for seed "
        f"{next(iter(routed.values()))['routing']['seed']}.",
        'A max weight means little without n: 1/n is exactly uniform routing, and "max x n" is the max',
        'weight in units of 1/n. "Deep" is the deepest quarter of routed sublayers (final routing excluded).',
        "",
        "| scheme | deep sublayers | deep max weight | deep 1/n | deep max x n | deep H / log n |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    sentences = []
    for scheme, entry in routed.items():
        deep = entry["routing"]["deep"]
        rows = [row for row in entry["routing"]["sublayers"] if row["label"] != "final"]
        first = rows[-int(deep["num_sublayers"])]["label"]
        ratio = deep["max_weight_times_n"]
        lines.append(
            f"| `{scheme}` | {int(deep['num_sublayers'])} from {first} | {deep['max_weight']:.3f} | "
            f"{deep['uniform_weight']:.3f} | {ratio:.1f} | {deep['normalized_entropy']:.3f} |"
        )
        sentences.append(
            f"- `{scheme}`: deep max weight {deep['max_weight']:.3f} beside 1/n = {deep['uniform_weight']:.3f} "
            f"({ratio:.1f} times uniform), H / log n = {deep['normalized_entropy']:.3f}."
        )
    lines += ["", *sentences, "", "By sublayer (max weight / 1/n / H / log n):", ""]

    header = "| sublayer | " + " | ".join(f"`{s}`" for s in routed) + " |"
    lines += [header, "| --- | " + " | ".join("---" for _ in routed) + " |"]
    labels: list[str] = []
    for entry in routed.values():
        for row in entry["routing"]["sublayers"]:
            if row["label"] not in labels:
                labels.append(row["label"])
    order = {label: i for i, label in enumerate(labels)}
    labels.sort(key=lambda lab: (lab == "final", _depth(lab), order[lab]))
    for label in labels:
        cells = []
        for entry in routed.values():
            row = next((r for r in entry["routing"]["sublayers"] if r["label"] == label), None)
            cells.append(
                "—"
                if row is None
                else f"{row['max_weight']:.3f} / {row['uniform_weight']:.3f} / {row['normalized_entropy']:.3f}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if figures.get("by_depth"):
        lines += ["", f"![max routing weight and normalised entropy by depth]({figures['by_depth']})"]
    if figures.get("sources"):
        lines += ["", f"![adjacent-source cosine and effective rank by depth]({figures['sources']})"]
    heatmaps = figures.get("heatmaps", {})
    if heatmaps:
        lines += ["", "### Mean routing weights", ""]
        for scheme in routed:
            if scheme in heatmaps:
                lines += [f"![mean routing weights of {scheme}]({heatmaps[scheme]})", ""]
    return lines


def _depth(label: str) -> tuple[int, int]:
    if label == "final":
        return (10**9, 0)
    layer, kind = label.split(".")
    return (int(layer), 0 if kind == "attn" else 1)


def write_report(
    out_dir: Path,
    report: dict[str, Any],
    traces: dict[tuple[str, int], RoutingTrace],
    schemes: Sequence[str],
    seeds: Sequence[int],
) -> None:
    """Write the figures, report.json and report.md; the loss curves come from the run folders in `out_dir`."""
    curves = {}
    for scheme in schemes:
        metrics = read_metrics(run_folder(out_dir, scheme, seeds[0]))
        curves[scheme] = [(m["tokens"], m["val_loss"]) for m in metrics if m["event"] == "eval"]
    plot_loss_curves(curves, out_dir / LOSS_PLOT, f"Validation loss (seed {seeds[0]})")
    figures = plot_routing_figures(
        {scheme: traces[(scheme, seeds[0])] for scheme in schemes}, out_dir, f" (seed {seeds[0]})"
    )
    write_json_atomic(out_dir / REPORT_JSON, report)
    write_text_atomic(out_dir / REPORT_MD, render_markdown(report, figures))
