"""Routing statistics, figures and the `routing` command: hand-computed values, source counts per
scheme, memory behaviour of the recorder, and end-to-end runs on a tiny trained model."""

from __future__ import annotations

import gc
import json
import math
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from delta_attnres import analysis
from delta_attnres.analysis import (
    RoutingAccumulator,
    RoutingTrace,
    effective_rank,
    model_labels,
    trace_routing,
)
from delta_attnres.cli import main
from delta_attnres.config import SCHEMES, ModelConfig, ResidualConfig
from delta_attnres.model import DecoderLM
from delta_attnres.plots import (
    BY_DEPTH_PLOT,
    DEPTH_FIGSIZE,
    DPI,
    SOURCES_PLOT,
    heatmap_figsize,
    plot_routing_figures,
)
from delta_attnres.runconfig import DataConfig, run_config_from_preset
from delta_attnres.train import train_run

ROUTED_SCHEMES = [name for name in SCHEMES if name != "standard"]
BLOCK_SCHEMES = ("attnres_block", "delta_block")
NUM_LAYERS = 4


def make_model(scheme: str, num_blocks: int = 1, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=NUM_LAYERS,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_seq_len=64,
        residual=ResidualConfig(scheme=scheme, num_blocks=num_blocks),
    )
    return DecoderLM(config)


def randomize_queries(model: DecoderLM, scale: float = 2.0) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".query"):
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def token_batches(count: int = 2, batch: int = 2, length: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (batch, length), generator=generator) for _ in range(count)]


def expected_source_labels(scheme: str, num_layers: int, num_blocks: int) -> dict[int, list[str]]:
    """Sources of every router with two or more of them, written out from the method's definitions."""
    sources, routing = SCHEMES[scheme]
    if sources == "none":
        return {}
    sublayers = 2 * num_layers
    labels: dict[int, list[str]] = {}
    for index in range(sublayers):
        if sources == "sublayer":  # [e, v_1, ..., v_{l-1}] for 1-based l = index + 1
            labels[index] = ["e"] + [f"v{k}" for k in range(1, index + 1)]
        elif sources == "cumulative":  # [h_1, ..., h_l]
            labels[index] = [f"h{k}" for k in range(1, index + 2)]
        else:
            block, position = divmod(index, sublayers // num_blocks)
            labels[index] = ["e"] + [f"B{k}" for k in range(1, block + 1)]
            if routing == "replacement" and position > 0:
                labels[index].append("partial")
    if routing == "replacement":  # the final routing before the output norm
        if sources == "sublayer":
            labels[sublayers] = ["e"] + [f"v{k}" for k in range(1, sublayers + 1)]
        elif sources == "cumulative":
            labels[sublayers] = [f"h{k}" for k in range(1, sublayers + 2)]
        else:
            labels[sublayers] = ["e"] + [f"B{k}" for k in range(1, num_blocks + 1)]
    return {index: names for index, names in labels.items() if len(names) > 1}


def scheme_cases() -> list[Any]:
    cases = [pytest.param("standard", 1, id="standard")]
    for scheme in ROUTED_SCHEMES:
        for num_blocks in (1, 2, 4) if scheme in BLOCK_SCHEMES else (1,):
            case_id = f"{scheme}-{num_blocks}" if scheme in BLOCK_SCHEMES else scheme
            cases.append(pytest.param(scheme, num_blocks, id=case_id))
    return cases


# Statistics on hand-built weights and sources


def test_statistics_of_hand_built_weights() -> None:
    config = make_model("delta").config
    accumulator = RoutingAccumulator(config)
    # Three sources of width 2: two tokens in one call, then a third token in a second call.
    first = torch.tensor([[0.5, 1 / 3], [0.25, 1 / 3], [0.25, 1 / 3]]).view(3, 1, 2)
    second = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    vectors = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])]
    accumulator.record(2, first, tuple(v.expand(1, 2, 2) for v in vectors))
    accumulator.record(2, second, tuple(v.expand(1, 1, 2) for v in vectors))

    trace = accumulator.result(num_tokens=3)
    (row,) = trace.sublayers
    entropies = [1.5 * math.log(2), math.log(3), 0.0]
    mean_entropy = sum(entropies) / 3
    assert row.sublayer == 2
    assert row.label == "1.attn"
    assert row.num_sources == 3
    assert row.source_labels == ["e", "v1", "v2"]
    assert row.uniform_weight == pytest.approx(1 / 3)
    assert row.max_weight == pytest.approx((0.5 + 1 / 3 + 1.0) / 3)
    assert row.entropy == pytest.approx(mean_entropy)
    assert row.normalized_entropy == pytest.approx(mean_entropy / math.log(3))
    assert row.effective_sources == pytest.approx(sum(math.exp(h) for h in entropies) / 3)
    assert row.mean_weights == pytest.approx([(0.5 + 1 / 3 + 1) / 3, (0.25 + 1 / 3) / 3, (0.25 + 1 / 3) / 3])
    assert row.adjacent_cosine == pytest.approx(1 / math.sqrt(2))
    # Unit rows [1, 0], [1, 1] / sqrt(2), [0, 1] have singular values sqrt(2) and 1.
    p = [math.sqrt(2) / (1 + math.sqrt(2)), 1 / (1 + math.sqrt(2))]
    assert row.effective_rank == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-5)
    assert trace.num_tokens == 3
    assert trace.token_ids is None
    assert row.token_weights is None


def test_effective_rank_of_hand_built_sources() -> None:
    orthogonal = torch.eye(4)[:3]  # three orthonormal rows in width 4
    parallel = torch.tensor([[1.0, 2.0], [2.0, 4.0], [-0.5, -1.0]])  # one direction, different norms
    assert effective_rank(orthogonal).item() == pytest.approx(3.0, rel=1e-5)
    assert effective_rank(parallel).item() == pytest.approx(1.0, rel=1e-5)
    assert effective_rank(torch.stack([orthogonal, torch.eye(4)[:3] * 7])).tolist() == pytest.approx(
        [3.0, 3.0], rel=1e-5
    )


def test_token_weights_are_capped_in_order() -> None:
    model = make_model("delta")
    randomize_queries(model)
    batches = token_batches(count=3, batch=2, length=4)  # 24 tokens, 5 kept
    trace = trace_routing(model, batches, token_weights=5)

    assert trace.token_ids == batches[0].flatten().tolist()[:5]
    for row in trace.sublayers:
        assert row.token_weights is not None
        assert len(row.token_weights) == 5, row.label
        assert all(len(weights) == row.num_sources for weights in row.token_weights), row.label
        assert all(sum(weights) == pytest.approx(1.0, abs=1e-5) for weights in row.token_weights), row.label


def test_token_weights_over_cap_rejected() -> None:
    with pytest.raises(ValueError, match="token_weights"):
        RoutingAccumulator(make_model("delta").config, token_weights=analysis.MAX_TOKEN_WEIGHTS + 1)


@pytest.mark.parametrize("scheme", ROUTED_SCHEMES)
def test_zero_queries_route_uniformly(scheme: str) -> None:
    model = make_model(scheme, num_blocks=2)  # fresh model: every query is exactly zero
    trace = trace_routing(model, token_batches())

    assert trace.sublayers, scheme
    for row in trace.sublayers:
        n = row.num_sources
        assert row.mean_weights == pytest.approx([1 / n] * n, abs=1e-6), row.label
        assert row.max_weight == pytest.approx(1 / n, abs=1e-6), row.label
        assert row.normalized_entropy == pytest.approx(1.0, abs=1e-5), row.label
        assert row.effective_sources == pytest.approx(n, rel=1e-5), row.label


@pytest.mark.parametrize(("scheme", "num_blocks"), scheme_cases())
def test_source_counts_match_method(scheme: str, num_blocks: int) -> None:
    model = make_model(scheme, num_blocks)
    trace = trace_routing(model, token_batches(count=1))
    expected = expected_source_labels(scheme, NUM_LAYERS, num_blocks)

    assert {row.sublayer: row.source_labels for row in trace.sublayers} == expected
    for row in trace.sublayers:
        assert row.num_sources == len(expected[row.sublayer]), row.label
        assert len(row.mean_weights) == row.num_sources, row.label
    if scheme == "standard":
        assert trace.sublayers == []
        assert trace.deep_summary() is None


def test_weight_matrix_marks_missing_sources() -> None:
    model = make_model("attnres_block", num_blocks=2)
    trace = trace_routing(model, token_batches(count=1))
    rows, columns, matrix = trace.weight_matrix()

    assert columns == ["e", "B1", "B2", "partial"]
    assert rows[0] == "0.mlp"
    assert rows[-1] == "final"
    first = dict(zip(columns, matrix[0], strict=True))  # 0.mlp routes over e and the partial sum
    assert first["e"] == pytest.approx(0.5)
    assert first["partial"] == pytest.approx(0.5)
    assert math.isnan(first["B1"])
    assert math.isnan(first["B2"])
    final = dict(zip(columns, matrix[-1], strict=True))
    assert math.isnan(final["partial"])
    assert final["B2"] == pytest.approx(1 / 3)


def test_trace_round_trips_through_json() -> None:
    model = make_model("attnres_full")
    randomize_queries(model)
    trace = trace_routing(model, token_batches(), token_weights=3)
    restored = RoutingTrace.from_dict(json.loads(json.dumps(trace.to_dict())))
    assert restored == trace


def test_deep_summary_averages_deepest_quarter() -> None:
    model = make_model("delta")  # sublayers 1..7 are routed, so the deepest quarter is 3.attn and 3.mlp
    randomize_queries(model)
    trace = trace_routing(model, token_batches())
    deep = trace.deep_summary()

    assert deep is not None
    rows = trace.sublayers[-2:]
    assert deep["num_sublayers"] == 2
    assert deep["first_sublayer"] == rows[0].sublayer
    assert deep["max_weight"] == pytest.approx(sum(r.max_weight for r in rows) / 2)
    assert deep["uniform_weight"] == pytest.approx((1 / 7 + 1 / 8) / 2)
    assert deep["max_weight_times_n"] == pytest.approx((rows[0].max_weight * 7 + rows[1].max_weight * 8) / 2)


# Cost and memory of recording


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_forward_without_recorder_runs_no_analysis() -> None:
    model = make_model("attnres_full").eval()
    randomize_queries(model)
    ids = token_batches(count=1)[0]

    with torch.no_grad():
        with OpCounter() as plain:
            logits = model(ids)
        with OpCounter() as explicit_none:
            model(ids, recorder=None)
        accumulator = RoutingAccumulator(model.config)
        with OpCounter() as recorded:
            recorded_logits = model(ids, recorder=accumulator)

    assert plain.ops == explicit_none.ops
    assert not [op for op in plain.ops if "svd" in op or "cosine" in op]
    assert [op for op in recorded.ops if "svd" in op]
    assert len(recorded.ops) > len(plain.ops)
    assert torch.equal(logits, recorded_logits)


def test_recorded_tensors_are_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the trace nor the accumulator may keep a recorded tensor, its graph or its sources."""
    references: list[weakref.ref[torch.Tensor]] = []
    original = RoutingAccumulator.record

    def record(self: RoutingAccumulator, sublayer: int, weights: torch.Tensor, sources: Any) -> None:
        references.extend(weakref.ref(tensor) for tensor in (weights, *sources))
        original(self, sublayer, weights, sources)

    monkeypatch.setattr(RoutingAccumulator, "record", record)
    model = make_model("delta")
    randomize_queries(model)

    trace = trace_routing(model, token_batches())
    # A recorder attached to a training forward with autograd on: recorded sources carry grad_fn.
    model.train()
    accumulator = RoutingAccumulator(model.config, token_weights=4)
    loss = model(token_batches(count=1)[0], recorder=accumulator).logsumexp(-1).mean()
    loss.backward()
    del loss
    gc.collect()

    assert trace.sublayers
    assert references
    assert [ref for ref in references if ref() is not None] == []
    for sums in accumulator.sums.values():
        for value in (sums.max, sums.entropy, sums.weights, sums.cosine, sums.rank, *sums.token_weights):
            assert not value.requires_grad
            assert value.grad_fn is None


def live_tensors() -> tuple[int, int]:
    """Return the number of live tensors reachable by the garbage collector and their storage bytes."""
    gc.collect()
    with warnings.catch_warnings():
        # isinstance() on torch.distributed's deprecated module attributes warns.
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    return len(tensors), sum(t.untyped_storage().nbytes() for t in tensors)


def test_repeated_traces_do_not_grow_memory() -> None:
    model = make_model("attnres_block", num_blocks=2)
    randomize_queries(model)
    batches = token_batches()
    for _ in range(2):  # warm-up: lazily created buffers and caches
        trace_routing(model, batches, token_weights=4)
    count_before, bytes_before = live_tensors()

    traces = [trace_routing(model, batches, token_weights=4) for _ in range(20)]
    count_after, bytes_after = live_tensors()

    assert count_after == count_before
    assert bytes_after == bytes_before
    assert all(trace == traces[0] for trace in traces)


def test_accumulator_size_independent_of_calls() -> None:
    model = make_model("delta").eval()
    accumulator = RoutingAccumulator(model.config)
    ids = token_batches(count=1)[0]
    with torch.no_grad():
        model(ids, recorder=accumulator)
        count_before, bytes_before = live_tensors()
        for _ in range(20):
            model(ids, recorder=accumulator)
        count_after, bytes_after = live_tensors()

    assert count_after == count_before
    assert bytes_after == bytes_before
    assert next(iter(accumulator.sums.values())).count == 21 * ids.numel()


# Figures


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG", path
        return image.size


def test_figures_have_expected_sizes(tmp_path: Path) -> None:
    traces = {}
    for scheme, num_blocks in (("attnres_full", 1), ("attnres_block", 2), ("standard", 1)):
        model = make_model(scheme, num_blocks)
        randomize_queries(model)
        traces[scheme] = trace_routing(model, token_batches(count=1))
    traces["attnres_full (copy)"] = traces["attnres_full"]

    files = plot_routing_figures(traces, tmp_path, " (test)")

    assert set(files["heatmaps"]) == {"attnres_full", "attnres_block", "attnres_full (copy)"}
    assert len(set(files["heatmaps"].values())) == 3
    for label, name in files["heatmaps"].items():
        rows, columns, _ = traces[label].weight_matrix()
        width, height = heatmap_figsize(len(rows), len(columns))
        assert png_size(tmp_path / name) == (int(width * DPI), int(height * DPI)), label
    depth_size = (int(DEPTH_FIGSIZE[0] * DPI), int(DEPTH_FIGSIZE[1] * DPI))
    assert files["by_depth"] == BY_DEPTH_PLOT
    assert files["sources"] == SOURCES_PLOT
    assert png_size(tmp_path / BY_DEPTH_PLOT) == depth_size
    assert png_size(tmp_path / SOURCES_PLOT) == depth_size
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [*files["heatmaps"].values(), BY_DEPTH_PLOT, SOURCES_PLOT]
    )


def test_figures_skipped_without_routing(tmp_path: Path) -> None:
    trace = trace_routing(make_model("standard"), token_batches(count=1))
    files = plot_routing_figures({"standard": trace}, tmp_path)
    assert files == {"heatmaps": {}, "by_depth": None, "sources": None}
    assert list(tmp_path.iterdir()) == []


def test_model_labels_disambiguate_duplicates() -> None:
    labels = model_labels(
        ["delta", "delta", "attnres_full", "delta_block", "delta_block"],
        [Path("a/run1"), Path("b/run2"), Path("c/run3"), Path("x/same"), Path("y/same")],
    )
    assert labels == [
        "delta (run1)",
        "delta (run2)",
        "attnres_full",
        "delta_block (same) #1",
        "delta_block (same) #2",
    ]


# The `routing` command


def write_corpus(folder: Path, documents: int = 6, repeat: int = 40) -> Path:
    """Write a few short English text files (public-domain verse) into `folder`."""
    lines = [
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.",
        "When in disgrace with fortune and men's eyes, I all alone beweep my outcast state.",
        "Let me not to the marriage of true minds admit impediments. Love is not love which alters.",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        text = "\n".join(lines[(index + k) % len(lines)] for k in range(repeat))
        (folder / f"doc{index}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny runs trained for 3 steps on a 6-document corpus with a 1/3 validation split."""
    root = tmp_path_factory.mktemp("routing_cli")
    corpus = write_corpus(root / "text")
    runs = {}
    for scheme in ("attnres_block", "delta"):
        config = run_config_from_preset(
            "tiny",
            {"residual": {"scheme": scheme, "num_blocks": 2}},
            {"steps": 3, "seq_len": 32, "eval_interval": 3, "eval_windows": 2, "device": "cpu"},
            DataConfig(sources=[str(corpus)], val_fraction=0.34),
        )
        runs[scheme] = root / scheme
        train_run(config, runs[scheme], progress=False, log=lambda line: None)
    runs["corpus"] = corpus
    return runs


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_routing_command_end_to_end(
    trained_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "routing"
    folders = [trained_runs["attnres_block"], trained_runs["delta"], trained_runs["delta"] / "model"]
    code, stdout, _ = run_cli(
        [
            "routing",
            "--model",
            *map(str, folders),
            "--max-windows",
            "4",
            "--token-weights",
            "3",
            "--out",
            str(out),
        ],
        capsys,
    )

    assert code == 0
    report = json.loads((out / "routing.json").read_text())
    labels = [model["label"] for model in report["models"]]
    assert labels == ["attnres_block", "delta (delta) #1", "delta (delta) #2"]
    for model in report["models"]:
        text = model["text"]
        assert text["split"] == "val", model["label"]
        assert text["val_fraction"] == 0.34, model["label"]  # from run.json, not the 0.1 default
        assert text["documents"] == 2, model["label"]  # round(0.34 * 6)
        assert text["seq_len"] == 32, model["label"]  # the run's training length
        assert len(text["token_strings"]) == 3, model["label"]
        trace = RoutingTrace.from_dict(model["trace"])
        assert trace.num_tokens == text["windows"] * 32, model["label"]
        assert trace.sublayers, model["label"]
        assert (out / model["heatmap"]).is_file(), model["label"]
        assert model["deep"]["uniform_weight"] < 1.0, model["label"]
    assert (out / "routing_max_weight.png").is_file()
    assert (out / "routing_sources.png").is_file()
    assert "attnres_block: 8 routed sublayers" in stdout
    assert "wrote" in stdout
    assert not [path for path in out.iterdir() if path.name.endswith(".tmp")]


def test_routing_command_all_documents(
    trained_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "routing"
    args = ["routing", "--model", str(trained_runs["delta"]), "--split", "all", "--max-windows", "2"]
    code, _, _ = run_cli([*args, "--seq-len", "16", "--out", str(out)], capsys)

    assert code == 0
    (model,) = json.loads((out / "routing.json").read_text())["models"]
    assert model["text"]["split"] == "all"
    assert model["text"]["documents"] == 6
    assert model["text"]["seq_len"] == 16
    assert model["trace"]["num_tokens"] == 2 * 16


@pytest.mark.parametrize("problem", ["missing", "file", "not_a_model"])
def test_routing_command_rejects_bad_model(
    problem: str, trained_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "input"
    if problem == "file":
        folder.write_text("not a model")
    elif problem == "not_a_model":
        folder.mkdir()
    args = ["routing", "--model", str(trained_runs["delta"]), str(folder), "--out", str(tmp_path / "out")]
    code, _, stderr = run_cli(args, capsys)

    assert code == 2
    assert stderr.startswith("delta-attnres routing: error: ")
    assert len(stderr.strip().splitlines()) == 1
    assert str(folder) in stderr
    assert not (tmp_path / "out" / "routing.json").exists()
