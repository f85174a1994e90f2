"""Benchmark of every residual scheme against the standard decoder at the same shape.

One run measures, for each scheme and for the naive stacking router (`implementation="naive"`):

- training step time (forward, backward, AdamW step) and tokens per second, in fp32 eager mode. The
  variants run round-robin, one step each per round, with the order rotated every round, so that drift
  of a shared machine hits every variant alike. Ratios to `standard` are the median of per-round ratios.
- bytes saved for backward, counted with `torch.autograd.graph.saved_tensors_hooks` over one forward
  pass and the loss. `saved_bytes` counts each distinct storage once, so a saved reference to a tensor
  that is alive anyway (a routing source) costs nothing extra. `saved_bytes_all` sums every saved
  tensor as if each were a copy. Parameters and buffers are excluded from both.
- peak resident memory of one training step, in a fresh process per variant: the high-water mark of
  the resident set during the step minus the resident set before it, measured once model, gradients
  and AdamW state all exist (Linux only).
- time per decoded token, greedy, batch 1, with a list-based KV cache.

The results go to `bench.json` in the output folder and a table of ratios to stdout.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import __version__
from .config import PUBLISHED_SCHEMES, SCHEMES, ModelConfig, ResidualConfig
from .model import DecoderLM, Router
from .runconfig import FP32_BYTES, format_bytes, physical_memory_bytes
from .storage import StorageError, check_output_path, write_json_atomic

RESULT_FILE = "bench.json"
BASELINE = "standard"
# BenchConfig fields and the names that error messages give them: the command-line flag where one sets
# the field.
POSITIVE_SETTINGS = {
    "hidden_size": "--hidden-size",
    "num_layers": "--layers",
    "num_heads": "--num-heads",
    "num_kv_heads": "--num-kv-heads",
    "intermediate_size": "--intermediate-size",
    "vocab_size": "--vocab-size",
    "num_blocks": "--num-blocks",
    "batch_size": "--batch-size",
    "seq_len": "--seq-len",
    "rounds": "--rounds",
    "sweep_rounds": "--sweep-rounds",
    "prompt_tokens": "bench prompt_tokens",
}
# Maximum prompt plus decoded tokens. Each decoded token attends to the whole KV cache, so decode time
# and cache size grow without bound in --decode-tokens. NOTE: 65536 is a chosen bound, not a measured one.
MAX_DECODE_CONTEXT = 65536
NON_NEGATIVE_SETTINGS = {
    "decode_tokens": "--decode-tokens",
    "warmup_steps": "bench warmup_steps",
    "seed": "bench seed",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class BenchConfig:
    """Shape and length of a benchmark run.

    The default shape is D 512, 12 layers, 8 heads (4 key/value heads), MLP width 1536, vocabulary 8192,
    sequence 256 and batch 4; `depths` is the extra depth sweep, run with `sweep_rounds` rounds. When a
    block scheme runs, `num_blocks` must divide `num_layers` and every depth.
    """

    schemes: tuple[str, ...] = PUBLISHED_SCHEMES
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1536
    vocab_size: int = 8192
    num_blocks: int = 4
    batch_size: int = 4
    seq_len: int = 256
    rounds: int = 7
    warmup_steps: int = 1
    depths: tuple[int, ...] = (4, 8, 16, 24)
    sweep_rounds: int = 3
    naive: bool = True
    peak_memory: bool = True
    decode_tokens: int = 16
    prompt_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every setting before anything is measured, naming the command-line flag that sets it."""
        unknown = [name for name in self.schemes if name not in SCHEMES]
        if unknown:
            raise ValueError(
                f"--schemes: unknown scheme(s) {', '.join(unknown)}; known: {', '.join(SCHEMES)}"
            )
        if not self.schemes:
            raise ValueError(
                f"--schemes is empty: expected comma-separated scheme names including {BASELINE!r}"
            )
        if BASELINE not in self.schemes:
            raise ValueError(
                f"--schemes {','.join(self.schemes)} must include {BASELINE!r}, the baseline of every ratio"
            )
        _reject_repeats(self.schemes, "--schemes", "scheme")
        _reject_repeats(self.depths, "--depths", "depth")
        for name, flag in POSITIVE_SETTINGS.items():
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{flag} {value!r} is invalid: expected a positive integer")
        for name, flag in NON_NEGATIVE_SETTINGS.items():
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{flag} {value!r} is invalid: expected 0 or a positive integer")
        invalid_depths = [depth for depth in self.depths if not _is_int(depth) or depth < 1]
        if invalid_depths:
            raise ValueError(
                f"--depths {','.join(map(str, self.depths))} is invalid: expected positive layer counts"
            )
        self._check_num_blocks()
        if self.prompt_tokens + self.decode_tokens > MAX_DECODE_CONTEXT:
            raise ValueError(
                f"--decode-tokens {self.decode_tokens} plus the {self.prompt_tokens} prompt tokens exceed "
                f"{MAX_DECODE_CONTEXT:,} tokens, the maximum decode length of the benchmark, because every "
                "decoded token attends to all tokens before it; lower --decode-tokens"
            )
        for num_layers in (self.num_layers, *self.depths):
            for scheme in self.schemes:
                self.model_config(scheme, num_layers)  # raises ValueError for an invalid model shape
        self._check_memory()

    def _check_memory(self) -> None:
        """Raise ValueError when the deepest shape needs more memory than the machine has.

        The estimate is a lower bound: one model per scheme is alive at once, each with float32 weights,
        gradients and two AdamW moments, plus the float32 logits and one hidden state per layer and token
        of one training step. Attention scores and the other saved activations come on top.
        """
        limit = physical_memory_bytes()
        if limit is None:
            return
        depth = max((self.num_layers, *self.depths))
        config = self.model_config(BASELINE, depth)
        state = len(self.schemes) * 4 * FP32_BYTES * config.base_parameter_count()
        tokens = self.batch_size * self.seq_len
        activations = FP32_BYTES * tokens * (self.vocab_size + depth * self.hidden_size)
        if state + activations <= limit:
            return
        depths = ",".join(map(str, self.depths)) or "none"
        raise ValueError(
            f"the benchmark needs at least {format_bytes(state + activations)} of memory, but this machine "
            f"has {format_bytes(limit)}: {format_bytes(state)} for the weights, gradients and AdamW state of "
            f"{len(self.schemes)} models of {config.base_parameter_count():,} parameters at {depth:,} layers "
            f"(--layers {self.num_layers}, --depths {depths}), and {format_bytes(activations)} for the "
            f"logits and activations of {self.batch_size:,} sequences of {self.seq_len:,} tokens; lower "
            "--batch-size or --seq-len, or shrink the model (--vocab-size, --hidden-size, --layers, "
            "--depths, --intermediate-size)"
        )

    def _check_num_blocks(self) -> None:
        block_schemes = [scheme for scheme in self.schemes if SCHEMES[scheme][0] == "block"]
        if not block_schemes:
            return  # only the block schemes read num_blocks
        uneven = [depth for depth in (self.num_layers, *self.depths) if depth % self.num_blocks]
        if uneven:
            counts = ", ".join(map(str, dict.fromkeys(uneven)))
            noun = "layer count" if len(set(uneven)) == 1 else "layer counts"
            depths = ",".join(map(str, self.depths)) or "none"
            raise ValueError(
                f"--num-blocks {self.num_blocks} does not divide the {noun} {counts} (--layers "
                f"{self.num_layers}, --depths {depths}); the block schemes ({', '.join(block_schemes)}) "
                "split the layers into equal blocks, so pass a --num-blocks that divides --layers and "
                "every --depths value, or leave the block schemes out of --schemes"
            )

    def model_config(self, scheme: str, num_layers: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_seq_len=max(self.seq_len, self.prompt_tokens + self.decode_tokens) + 1,
            residual=ResidualConfig(scheme=scheme, num_blocks=self.num_blocks),
        )


# A quick run for tests and smoke checks: tiny shape, two rounds and a depth sweep over 2 and 4 layers.
QUICK_SETTINGS: dict[str, Any] = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    vocab_size=256,
    num_blocks=2,
    batch_size=2,
    seq_len=32,
    rounds=2,
    depths=(2, 4),
    sweep_rounds=1,
    decode_tokens=4,
    prompt_tokens=4,
)


def _reject_repeats(values: Sequence[Any], flag: str, noun: str) -> None:
    repeated = [value for index, value in enumerate(values) if value in values[:index]]
    if repeated:
        raise ValueError(
            f"{flag} {','.join(map(str, values))} lists the {noun} {repeated[0]} more than once; "
            f"name each {noun} once"
        )


def _parse_ints(text: str, flag: str) -> tuple[int, ...]:
    """Parse comma-separated integers, skipping empty items as compare does; 'none' is the empty tuple."""
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise ValueError(
            f"{flag} {text!r} is invalid: expected comma-separated integers or 'none'"
        ) from error
    if not values:
        raise ValueError(f"{flag} {text!r} names no layer count; pass 'none' to skip the depth sweep")
    return values


def _parse_names(text: str, flag: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError(
            f"{flag} {text!r} names no scheme; expected a comma-separated list that includes {BASELINE!r}"
        )
    return names


def bench_config(
    quick: bool = False, schemes: str | None = None, depths: str | None = None, **changes: Any
) -> BenchConfig:
    """Build a BenchConfig from command-line values; None leaves the default (or the --quick value)."""
    values: dict[str, Any] = dict(QUICK_SETTINGS) if quick else {}
    values.update({name: value for name, value in changes.items() if value is not None})
    if schemes is not None:
        values["schemes"] = _parse_names(schemes, "--schemes")
    if depths is not None:
        values["depths"] = _parse_ints(depths, "--depths")
    return BenchConfig(**values)


@dataclass(frozen=True)
class Variant:
    """A scheme with a routing implementation; `standard` has no router, so only `fused` applies."""

    scheme: str
    implementation: str = "fused"

    @property
    def name(self) -> str:
        return self.scheme if self.implementation == "fused" else f"{self.scheme} ({self.implementation})"


def bench_variants(config: BenchConfig) -> list[Variant]:
    variants = [Variant(scheme) for scheme in config.schemes]
    if config.naive:
        variants += [Variant(scheme, "naive") for scheme in config.schemes if scheme != BASELINE]
    return variants


# Building blocks


def build_model(model_config: ModelConfig, seed: int) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(model_config)
    model.train()
    return model


def set_implementation(model: DecoderLM, implementation: str) -> None:
    """Switch every router of `model` between the fused and the naive routing kernel."""
    for module in model.modules():
        if isinstance(module, Router):
            module.implementation = implementation


def make_batch(config: BenchConfig, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (config.batch_size, config.seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def language_model_loss(model: DecoderLM, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train_step(model: DecoderLM, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor) -> None:
    language_model_loss(model, inputs, targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class SavedBytes:
    """Bytes that autograd saved for backward, parameters and buffers excluded.

    `distinct` counts each storage once (the memory actually kept alive by the graph); `all` sums every
    saved tensor separately.
    """

    distinct: int
    all: int


def count_saved_bytes(model: DecoderLM, inputs: Tensor, targets: Tensor) -> SavedBytes:
    """Run one forward pass and the loss, and count the bytes autograd saved for backward."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        # Saved tensors stay alive until the graph is freed, so no address is reused during the count.
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
            total += tensor.numel() * tensor.element_size()
        # Detached, because a tensor saved by the node that produced it would otherwise hold that node
        # through its grad_fn: a reference cycle in C++ that keeps the whole graph alive.
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = language_model_loss(model, inputs, targets)
    del loss
    return SavedBytes(distinct=sum(storages.values()), all=total)


class ListCache:
    """The smallest KV cache the decoder accepts: per layer, keys and values concatenated over time."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=-2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0


@torch.no_grad()
def decode_times(model: DecoderLM, prompt: Tensor, new_tokens: int) -> list[float]:
    """Greedily decode `new_tokens` after `prompt` (1, P) with a KV cache; return the seconds per token."""
    was_training = model.training
    model.eval()
    cache = ListCache()
    logits = model(prompt, cache=cache)
    times = []
    for _ in range(new_tokens):
        next_token = logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        logits = model(next_token, cache=cache)
        times.append(time.perf_counter() - started)
    model.train(was_training)
    return times


# Peak memory, in a fresh process per variant


def _proc_status_bytes(field: str) -> int | None:
    """Return a "kB" field of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux 4.0 and later); return whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def measure_peak_memory(config: BenchConfig, variant: Variant, num_layers: int) -> dict[str, int | None]:
    """Build a model with gradients and AdamW state, then run one training step; call in a fresh process.

    Returns the peak resident set during the step (`peak_rss_bytes`) and how far the step raised it above
    the resident set before it (`step_peak_bytes`). Both come from /proc/self/status. Without /proc they
    are None, because `ru_maxrss` would include the parent's resident set inherited at fork.
    """
    model = build_model(config.model_config(variant.scheme, num_layers), config.seed)
    set_implementation(model, variant.implementation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # creates the AdamW state; the gradients stay allocated, as inside a real step
    inputs, targets = make_batch(config, config.seed)
    # A few tokens through forward and backward first, so that one-time setup of the autograd engine
    # and the allocator is not counted as part of the step.
    language_model_loss(model, inputs[:1, :8], targets[:1, :8]).backward()
    optimizer.zero_grad(set_to_none=False)

    reset = _reset_peak_rss()
    before = _proc_status_bytes("VmRSS")
    language_model_loss(model, inputs, targets).backward()
    optimizer.step()
    peak = _proc_status_bytes("VmHWM") if reset else None
    step_peak = None if peak is None or before is None else max(0, peak - before)
    return {"peak_rss_bytes": peak, "step_peak_bytes": step_peak}


def _peak_memory_in_subprocess(
    config: BenchConfig, variant: Variant, num_layers: int
) -> dict[str, int | None]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure_peak_memory, config, variant, num_layers).result()


# One shape


def _median_ratio(values: Sequence[float], baseline: Sequence[float]) -> float:
    return statistics.median(value / base for value, base in zip(values, baseline, strict=True))


def _round_order(variants: list[Variant], round_index: int) -> list[Variant]:
    shift = round_index % len(variants)
    return variants[shift:] + variants[:shift]


def measure_shape(
    config: BenchConfig,
    num_layers: int,
    rounds: int,
    with_peak_memory: bool,
    with_decode: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Measure every variant at one depth; return per-variant figures with ratios to `standard`."""
    variants = bench_variants(config)
    inputs, targets = make_batch(config, config.seed)
    models = {
        scheme: build_model(config.model_config(scheme, num_layers), config.seed) for scheme in config.schemes
    }
    figures: dict[Variant, dict[str, Any]] = {variant: {} for variant in variants}

    for variant in variants:
        model = models[variant.scheme]
        set_implementation(model, variant.implementation)
        saved = count_saved_bytes(model, inputs, targets)
        figures[variant].update(saved_bytes=saved.distinct, saved_bytes_all=saved.all)

    optimizers = {scheme: torch.optim.AdamW(model.parameters(), lr=1e-4) for scheme, model in models.items()}
    wall: dict[Variant, list[float]] = {variant: [] for variant in variants}
    cpu: dict[Variant, list[float]] = {variant: [] for variant in variants}
    load_per_round = []
    for round_index in range(-config.warmup_steps, rounds):
        for variant in _round_order(variants, round_index):
            model = models[variant.scheme]
            set_implementation(model, variant.implementation)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            train_step(model, optimizers[variant.scheme], inputs, targets)
            if round_index >= 0:  # negative rounds are warmup
                wall[variant].append(time.perf_counter() - wall_start)
                cpu[variant].append(time.process_time() - cpu_start)
        if round_index >= 0:
            load_per_round.append(_load_average())
            log(f"  layers {num_layers}: round {round_index + 1}/{rounds} done, load {load_per_round[-1]}")
    del optimizers

    if with_decode and config.decode_tokens > 0:
        prompt = inputs[:1, : config.prompt_tokens]
        decode: dict[Variant, list[float]] = {variant: [] for variant in variants}
        for round_index in range(rounds):
            for variant in _round_order(variants, round_index):
                model = models[variant.scheme]
                set_implementation(model, variant.implementation)
                decode[variant].append(statistics.median(decode_times(model, prompt, config.decode_tokens)))
        for variant in variants:
            figures[variant]["decode_s_per_token"] = statistics.median(decode[variant])
            figures[variant]["decode_times_s"] = decode[variant]
    del models

    tokens = config.batch_size * config.seq_len
    for variant in variants:
        step_time = statistics.median(wall[variant])
        figures[variant].update(
            step_time_s=step_time,
            min_step_time_s=min(wall[variant]),
            tokens_per_s=tokens / step_time,
            cpu_time_s=statistics.median(cpu[variant]),
            step_times_s=wall[variant],
            cpu_times_s=cpu[variant],
        )
    if with_peak_memory:
        for variant in variants:
            log(f"  layers {num_layers}: peak memory of {variant.name}")
            figures[variant].update(_peak_memory_in_subprocess(config, variant, num_layers))

    baseline = Variant(BASELINE)
    for variant in variants:
        _add_ratios(
            figures[variant], figures[baseline], wall[variant], wall[baseline], cpu[variant], cpu[baseline]
        )
    return {**_nest_by_scheme(figures, num_layers), "load_average_per_round": load_per_round}


def _add_ratios(
    figures: dict[str, Any],
    base: dict[str, Any],
    wall: list[float],
    base_wall: list[float],
    cpu: list[float],
    base_cpu: list[float],
) -> None:
    figures["step_time_ratio"] = _median_ratio(wall, base_wall)
    # The fastest step is the one least disturbed by other processes on a shared machine.
    figures["min_step_time_ratio"] = min(wall) / min(base_wall)
    figures["cpu_time_ratio"] = _median_ratio(cpu, base_cpu)
    figures["saved_bytes_ratio"] = figures["saved_bytes"] / base["saved_bytes"]
    figures["saved_bytes_all_ratio"] = figures["saved_bytes_all"] / base["saved_bytes_all"]
    if figures.get("step_peak_bytes") and base.get("step_peak_bytes"):
        figures["step_peak_ratio"] = figures["step_peak_bytes"] / base["step_peak_bytes"]
    if "decode_s_per_token" in figures:
        figures["decode_time_ratio"] = figures["decode_s_per_token"] / base["decode_s_per_token"]


def _nest_by_scheme(figures: dict[Variant, dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Return {"num_layers", "schemes": {scheme: fused figures + {"naive": naive figures}}}."""
    schemes: dict[str, Any] = {}
    for variant, values in figures.items():
        if variant.implementation == "fused":
            schemes.setdefault(variant.scheme, {}).update(values)
        else:
            schemes.setdefault(variant.scheme, {})[variant.implementation] = values
    return {"num_layers": num_layers, "schemes": schemes}


# Whole run


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass  # not Linux: keep the value from the platform module
    return {
        "cpu": cpu_model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def run_bench(
    config: BenchConfig,
    out_dir: str | Path,
    command: str,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the benchmark, write `out_dir/bench.json` atomically, print the tables and return the result.

    The file is rewritten after the main shape and after each depth of the sweep, with `complete`
    false until the end, so a run that dies part way keeps what it measured. Before anything is
    measured, raises StorageError when `out_dir` cannot be written or already contains a bench.json and
    `overwrite` is false.
    """
    path = check_output_path(out_dir, "--out") / RESULT_FILE
    if path.is_dir():
        raise StorageError(f"{path} is a folder, so bench.json cannot be written; choose another --out")
    if path.exists() and not overwrite:
        raise StorageError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    started = datetime.datetime.now(datetime.timezone.utc)
    result: dict[str, Any] = {
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "complete": False,
        "delta_attnres_version": __version__,
        "torch_version": torch.__version__,
        "machine": machine_info(),
        "load_average_before": _load_average(),
        "settings": dataclasses.asdict(config),
    }

    log(f"bench: {len(bench_variants(config))} variants, {config.num_layers} layers, {config.rounds} rounds")
    result.update(
        measure_shape(config, config.num_layers, config.rounds, config.peak_memory, with_decode=True, log=log)
    )
    result["depth_sweep"] = []
    write_json_atomic(path, result)
    log(format_main_table(result))

    for depth in config.depths:
        log(f"bench: depth sweep, {depth} layers")
        result["depth_sweep"].append(
            measure_shape(
                config, depth, config.sweep_rounds, with_peak_memory=False, with_decode=False, log=log
            )
        )
        write_json_atomic(path, result)

    result["complete"] = True
    result["load_average_after"] = _load_average()
    result["duration_s"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    write_json_atomic(path, result)
    if result["depth_sweep"]:
        log(format_sweep_table(result))
    log(f"bench: wrote {path}")
    return result


# Tables


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rows(schemes: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for scheme, figures in schemes.items():
        rows.append((scheme, figures))
        if "naive" in figures:
            rows.append((f"{scheme} (naive)", figures["naive"]))
    return rows


def format_main_table(result: dict[str, Any]) -> str:
    header = (
        f"{'scheme':<24} {'step s':>7} {'ratio':>6} {'min':>6} {'tok/s':>7} {'saved MiB':>9} {'ratio':>6} "
        f"{'all MiB':>8} {'step peak MiB':>13} {'ratio':>6} {'decode ms':>9} {'ratio':>6}"
    )
    title = (
        f"{result['num_layers']} layers, ratios to {BASELINE} in the same run "
        "(step ratio: median of per-round ratios; min: fastest step over fastest step)"
    )
    lines = [title, header]
    for name, figures in _rows(result["schemes"]):
        decode = figures.get("decode_s_per_token")
        lines.append(
            f"{name:<24} {figures['step_time_s']:>7.3f} {_ratio(figures['step_time_ratio']):>6} "
            f"{_ratio(figures['min_step_time_ratio']):>6} "
            f"{figures['tokens_per_s']:>7.0f} {_mib(figures['saved_bytes']):>9} "
            f"{_ratio(figures['saved_bytes_ratio']):>6} {_mib(figures['saved_bytes_all']):>8} "
            f"{_mib(figures.get('step_peak_bytes')):>13} {_ratio(figures.get('step_peak_ratio')):>6} "
            f"{'-' if decode is None else f'{decode * 1e3:.2f}':>9} {_ratio(figures.get('decode_time_ratio')):>6}"
        )
    return "\n".join(lines)


def format_sweep_table(result: dict[str, Any]) -> str:
    depths = [entry["num_layers"] for entry in result["depth_sweep"]]
    header = f"{'scheme':<24} " + " ".join(f"{f'L={depth} step/saved':>18}" for depth in depths)
    lines = ["depth sweep: step time ratio / saved bytes ratio to standard", header]
    names = [name for name, _ in _rows(result["depth_sweep"][0]["schemes"])]
    for name in names:
        cells = []
        for entry in result["depth_sweep"]:
            figures = dict(_rows(entry["schemes"]))[name]
            cells.append(f"{figures['step_time_ratio']:.3f} / {figures['saved_bytes_ratio']:.3f}")
        lines.append(f"{name:<24} " + " ".join(f"{cell:>18}" for cell in cells))
    return "\n".join(lines)
