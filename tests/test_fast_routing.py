"""Tests of the fused routing kernel's gradient accumulation, saved tensors, compile and benchmark.

test_routing.py checks the kernel's math against the naive router. These tests cover what the fused
kernel does differently: one gradient accumulator per source, shared by every router that reads it, and
nothing but (S, B, T) tensors saved beyond references. They also cover `torch.compile`, activation
checkpointing and the benchmark.
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from delta_attnres import bench
from delta_attnres.config import PUBLISHED_SCHEMES, SCHEMES, ModelConfig, ResidualConfig
from delta_attnres.model import DecoderLM
from delta_attnres.routing import inverse_rms, naive_route, route

EPS = 1e-6
WIDTH = 6
ROUTED_SCHEMES = [name for name in SCHEMES if name != "standard"]
BLOCK_SCHEMES = ("attnres_block", "delta_block")


def make_sources(count: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        ((index + 1) * torch.randn(2, 3, WIDTH, generator=generator, dtype=dtype)).requires_grad_()
        for index in range(count)
    ]


def make_router_params(seed: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(WIDTH, generator=generator, dtype=dtype).requires_grad_()
    gain = (0.5 + torch.rand(WIDTH, generator=generator, dtype=dtype)).requires_grad_()
    return query, gain


def two_router_stack(
    query_a: Tensor, gain_a: Tensor, query_b: Tensor, gain_b: Tensor, *sources: Tensor
) -> Tensor:
    """Route the sources twice, as two sublayers do, and mix the results nonlinearly.

    Router b reads the first three sources and router a's output. Both routers read sources 0 to 2, so
    their gradients meet in the same accumulators.
    """
    inv_rms = [inverse_rms(source, EPS) for source in sources]
    mixed_a, _ = route(query_a, gain_a, sources, inv_rms)
    hidden = torch.tanh(mixed_a)
    second_sources = [*sources[:3], hidden]
    mixed_b, _ = route(query_b, gain_b, second_sources, [*inv_rms[:3], inverse_rms(hidden, EPS)])
    return mixed_b * hidden


def naive_two_router_stack(
    query_a: Tensor, gain_a: Tensor, query_b: Tensor, gain_b: Tensor, *sources: Tensor
) -> Tensor:
    mixed_a, _ = naive_route(query_a, gain_a, sources, EPS)
    hidden = torch.tanh(mixed_a)
    mixed_b, _ = naive_route(query_b, gain_b, [*sources[:3], hidden], EPS)
    return mixed_b * hidden


# Gradients of the routing op


def test_shared_sources_gradcheck() -> None:
    inputs = [*make_router_params(1), *make_router_params(2), *make_sources(4)]

    assert torch.autograd.gradcheck(two_router_stack, inputs)


def test_shared_sources_match_naive() -> None:
    inputs = [*make_router_params(1), *make_router_params(2), *make_sources(4)]
    upstream = torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    fused = torch.autograd.grad((two_router_stack(*inputs) * upstream).sum(), inputs)
    naive = torch.autograd.grad((naive_two_router_stack(*inputs) * upstream).sum(), inputs)

    for index, (fused_grad, naive_grad) in enumerate(zip(fused, naive, strict=True)):
        torch.testing.assert_close(
            fused_grad, naive_grad, msg=lambda message, i=index: f"input {i}: {message}"
        )


def test_precomputed_inverse_rms_gradcheck() -> None:
    """Inverse RMS given as plain tensors (no accumulator): the router returns source gradients itself."""
    query, gain = make_router_params(3)
    sources = make_sources(3)
    inv_rms = [inverse_rms(source.detach(), EPS).requires_grad_() for source in sources]

    def mix(query: Tensor, gain: Tensor, *tensors: Tensor) -> Tensor:
        return route(query, gain, tensors[3:], tensors[:3])[0]

    assert torch.autograd.gradcheck(mix, [query, gain, *inv_rms, *sources])


def plain_inverse_rms(source: Tensor) -> Tensor:
    """The inverse RMS in plain differentiable ops, without an accumulator."""
    return torch.rsqrt(source.pow(2).mean(-1) + EPS)


def test_mismatched_inverse_rms_not_accumulated() -> None:
    """An inverse RMS computed from another tensor must not receive the source's routing gradient."""
    query, gain = make_router_params(4)
    sources = make_sources(2)
    other = sources[0].detach().clone().requires_grad_()  # same values, different tensor

    mixed, _ = route(query, gain, sources, [inverse_rms(other, EPS), inverse_rms(sources[1], EPS)])
    actual = torch.autograd.grad(mixed.sum(), [other, *sources])
    mixed, _ = route(query, gain, sources, [plain_inverse_rms(other), plain_inverse_rms(sources[1])])
    expected = torch.autograd.grad(mixed.sum(), [other, *sources])

    for name, a, b in zip(("other", "source 0", "source 1"), actual, expected, strict=True):
        torch.testing.assert_close(a, b, msg=lambda message, n=name: f"{n}: {message}")


def test_inverse_rms_gradcheck() -> None:
    sources = make_sources(1)

    assert torch.autograd.gradcheck(lambda source: inverse_rms(source, EPS), sources)


def test_retained_graph_second_backward() -> None:
    """A backward that stops before the sources must not leave stale sums for a later one."""
    inputs = [*make_router_params(1), *make_router_params(2), *make_sources(4)]
    output = two_router_stack(*inputs).sum()

    torch.autograd.grad(output, [inputs[0]], retain_graph=True)
    first = torch.autograd.grad(output, inputs, retain_graph=True)
    second = torch.autograd.grad(output, inputs)

    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        torch.testing.assert_close(a, b, msg=lambda message, i=index: f"input {i}: {message}")


def test_route_saves_references_and_logits() -> None:
    """Beyond references to live tensors, a route call saves only (S, B, T) logits and the (D,) query."""
    query, gain = make_router_params(1, torch.float32)
    sources = make_sources(5, torch.float32)
    inv_rms = [inverse_rms(source, EPS) for source in sources]
    live = {tensor.untyped_storage().data_ptr() for tensor in (query, gain, *sources, *inv_rms)}
    new_saved: list[tuple[int, ...]] = []

    def pack(tensor: Tensor) -> Tensor:
        if tensor.untyped_storage().data_ptr() not in live:
            new_saved.append(tuple(tensor.shape))
        return tensor.detach()  # no reference cycle through the grad_fn of saved outputs

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        route(query, gain, sources, inv_rms)

    assert sorted(new_saved) == [(5, 2, 3), (WIDTH,)]


def test_route_bf16_returns_bf16() -> None:
    query, gain = make_router_params(1, torch.float32)
    sources = [source.detach().bfloat16().requires_grad_() for source in make_sources(3, torch.float32)]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        inv_rms = [inverse_rms(source, EPS) for source in sources]
        mixed, weights = route(query, gain, sources, inv_rms)
    mixed.float().sum().backward()

    assert mixed.dtype == torch.bfloat16
    assert weights.dtype == torch.float32
    assert all(inv.dtype == torch.float32 for inv in inv_rms)
    for source in sources:
        assert source.grad is not None
        assert source.grad.dtype == torch.bfloat16


# Whole-model gradients


SIZES: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    max_seq_len=32,
    init_std=0.1,
)


def model_cases() -> list[Any]:
    cases = []
    for scheme in ROUTED_SCHEMES:
        for num_blocks in (1, 2, 4) if scheme in BLOCK_SCHEMES else (1,):
            for gate in (False, True) if SCHEMES[scheme][1] == "additive" else (False,):
                case_id = scheme
                if scheme in BLOCK_SCHEMES:
                    case_id += f"-{num_blocks}"
                if gate:
                    case_id += "-gate"
                cases.append(pytest.param(scheme, num_blocks, gate, id=case_id))
    return cases


def build_model(
    scheme: str, num_blocks: int = 1, gate: bool = False, implementation: str = "fused"
) -> DecoderLM:
    config = ModelConfig(
        **SIZES,
        residual=ResidualConfig(
            scheme=scheme, num_blocks=num_blocks, gate=gate, implementation=implementation
        ),
    )
    torch.manual_seed(0)
    model = DecoderLM(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # routers away from their uniform start, so every path carries gradient
        for name, param in model.named_parameters():
            if name.endswith(".query"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".gate") or name.endswith("key_norm.weight"):
                param.copy_(0.75 + 0.5 * torch.rand(param.shape, generator=generator))
    return model


def token_ids(batch: int = 2, length: int = 8) -> Tensor:
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(3))


def model_gradients(model: DecoderLM, ids: Tensor, forward: Any = None) -> dict[str, Tensor]:
    """Return the loss gradients of `model`'s parameters, computing logits with `forward` (default: model)."""
    model.zero_grad(set_to_none=True)
    logits = (model if forward is None else forward)(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def assert_same_gradients(actual: dict[str, Tensor], expected: dict[str, Tensor], tolerance: float) -> None:
    assert set(actual) == set(expected)
    for name, gradient in actual.items():
        torch.testing.assert_close(
            gradient,
            expected[name],
            atol=tolerance,
            rtol=tolerance,
            msg=lambda message, n=name: f"{n}: {message}",
        )


@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), model_cases())
def test_model_fused_gradients_match_naive(scheme: str, num_blocks: int, gate: bool) -> None:
    fused = build_model(scheme, num_blocks, gate, "fused")
    naive = build_model(scheme, num_blocks, gate, "naive")
    naive.load_state_dict(fused.state_dict())
    ids = token_ids()

    assert_same_gradients(model_gradients(fused, ids), model_gradients(naive, ids), 1e-5)


@pytest.mark.parametrize("implementation", ["fused", "naive"])
@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), model_cases())
def test_checkpointing_same_gradients(scheme: str, num_blocks: int, gate: bool, implementation: str) -> None:
    model = build_model(scheme, num_blocks, gate, implementation)
    ids = token_ids()

    expected = model_gradients(model, ids)
    model.set_gradient_checkpointing(True)

    assert_same_gradients(model_gradients(model, ids), expected, 1e-6)


def test_checkpointing_saves_less() -> None:
    model = build_model("delta")
    ids = token_ids()
    full = bench.count_saved_bytes(model, ids[:, :-1], ids[:, 1:])
    model.set_gradient_checkpointing(True)

    checkpointed = bench.count_saved_bytes(model, ids[:, :-1], ids[:, 1:])

    assert checkpointed.distinct < full.distinct / 2


@pytest.mark.parametrize("scheme", PUBLISHED_SCHEMES)
def test_model_bf16_autocast_gradients(scheme: str) -> None:
    model = build_model(scheme)
    ids = token_ids()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()

    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        assert param.grad.dtype == torch.float32, f"{name} gradient is {param.grad.dtype}"
        assert bool(torch.isfinite(param.grad).all()), f"{name} has a non-finite gradient"


# torch.compile


def compiled_gradients(model: DecoderLM, ids: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Compile the whole model with fullgraph=True and run two training steps through it.

    An SGD step between the two calls changes the parameters, as training does. The second call must
    reuse the first graph: `error_on_recompile` makes any recompilation raise. Returns the gradients of
    the second call and the dynamo counters.
    """
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    model_gradients(model, ids, compiled)
    optimizer.step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        gradients = model_gradients(model, ids, compiled)
    return gradients, {"stats": dict(counters["stats"]), "graph_break": dict(counters["graph_break"])}


def check_compiled_model(scheme: str, checkpointing: bool) -> None:
    model = build_model(scheme, num_blocks=2)
    model.set_gradient_checkpointing(checkpointing)
    ids = token_ids()

    gradients, counters = compiled_gradients(model, ids)
    expected = model_gradients(model, ids)

    assert counters["stats"]["unique_graphs"] == 1, counters
    assert counters["graph_break"] == {}, counters
    assert_same_gradients(gradients, expected, 1e-5)


def test_compiled_checkpointed_model_compiles_once() -> None:
    """The one compile test of the default run: 33 s on a 2-core CPU, under 20 s with a warm compile cache."""
    check_compiled_model("delta", checkpointing=True)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [name for name in PUBLISHED_SCHEMES if name != "standard"])
def test_compiled_model_compiles_once(scheme: str) -> None:
    check_compiled_model(scheme, checkpointing=False)


@pytest.mark.slow
def test_train_with_compile_and_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from run_helpers import read_records, tiny_config, write_corpus

    from delta_attnres.train import train_run

    monkeypatch.setenv("DELTA_ATTNRES_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    compiled = train_run(
        tiny_config(corpus, "delta_block", steps=2, compile=True, activation_checkpointing=True),
        tmp_path / "compiled",
        progress=False,
        log=lambda line: None,
    )
    train_run(
        tiny_config(corpus, "delta_block", steps=2), tmp_path / "eager", progress=False, log=lambda line: None
    )

    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    compiled_losses = [record["loss"] for record in read_records(tmp_path / "compiled")]
    eager_losses = [record["loss"] for record in read_records(tmp_path / "eager")]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert math.isfinite(compiled.val_loss)


# Saved activation memory against depth


def saved_bytes_by_depth(scheme: str, implementation: str, depths: tuple[int, ...]) -> list[int]:
    counts = []
    for depth in depths:
        config = ModelConfig(
            vocab_size=64,
            hidden_size=64,
            num_layers=depth,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            residual=ResidualConfig(scheme=scheme, implementation=implementation),
        )
        torch.manual_seed(0)
        ids = token_ids(2, 16)
        counts.append(bench.count_saved_bytes(DecoderLM(config), ids[:, :-1], ids[:, 1:]).distinct)
    return counts


def test_count_saved_bytes_frees_graph() -> None:
    """Counting must not keep the forward graph, and with it the parameters, alive."""
    model = build_model("delta")
    ids = token_ids()
    weight = weakref.ref(model.lm_head.weight)

    bench.count_saved_bytes(model, ids[:, :-1], ids[:, 1:])
    del model
    gc.collect()

    assert weight() is None


@pytest.mark.parametrize("scheme", ["delta", "attnres_full"])
def test_fused_saved_bytes_linear_in_depth(scheme: str) -> None:
    """Bytes saved per added layer stay constant for the fused kernel but grow for the naive one.

    In the fused kernel only the (S, B, T) logits grow faster than depth. At D 64 the bytes per added
    layer grew by 1% from 2-4 to 4-8 layers, and by 56-62% with the naive kernel.
    """
    fused = saved_bytes_by_depth(scheme, "fused", (2, 4, 8))
    naive = saved_bytes_by_depth(scheme, "naive", (2, 4, 8))

    fused_growth = (fused[2] - fused[1]) / 2 / (fused[1] - fused[0])
    naive_growth = (naive[2] - naive[1]) / 2 / (naive[1] - naive[0])

    assert fused_growth < 1.1, f"fused bytes per layer grew by {fused_growth:.3f} from 2-4 to 4-8 layers"
    assert naive_growth > 1.3, f"naive bytes per layer grew by only {naive_growth:.3f}"


# Benchmark


def check_figures(figures: dict[str, Any], name: str) -> None:
    for key in ("step_time_ratio", "saved_bytes_ratio", "cpu_time_ratio", "step_time_s", "tokens_per_s"):
        value = figures[key]
        assert math.isfinite(value), f"{name}: {key} = {value}"
        assert value > 0, f"{name}: {key} = {value}"
    assert figures["saved_bytes"] > 0, f"{name}: saved_bytes = {figures['saved_bytes']}"
    assert figures["saved_bytes_all"] >= figures["saved_bytes"], name


def test_bench_quick_run(tmp_path: Path) -> None:
    config = bench.bench_config(quick=True, peak_memory=False)
    lines: list[str] = []

    bench.run_bench(config, tmp_path, command="delta-attnres bench --quick", log=lines.append)
    result = json.loads((tmp_path / bench.RESULT_FILE).read_text())

    assert result["command"] == "delta-attnres bench --quick"
    assert result["complete"] is True
    assert result["torch_version"] == torch.__version__
    assert result["machine"]["cpu"]
    assert set(result["schemes"]) == set(PUBLISHED_SCHEMES)
    for scheme, figures in result["schemes"].items():
        check_figures(figures, scheme)
        assert figures["decode_s_per_token"] > 0, scheme
        if scheme != "standard":
            check_figures(figures["naive"], f"{scheme} (naive)")
    assert result["schemes"]["standard"]["step_time_ratio"] == 1.0
    assert [entry["num_layers"] for entry in result["depth_sweep"]] == [2, 4]
    for entry in result["depth_sweep"]:
        for scheme, figures in entry["schemes"].items():
            check_figures(figures, f"{scheme} at {entry['num_layers']} layers")
    assert any("ratios to standard" in line for line in lines)


def test_bench_peak_memory_in_process() -> None:
    config = bench.bench_config(quick=True)

    figures = bench.measure_peak_memory(config, bench.Variant("delta"), num_layers=2)

    assert figures["peak_rss_bytes"] is not None
    assert figures["peak_rss_bytes"] > 0
    assert figures["step_peak_bytes"] is not None
    assert figures["step_peak_bytes"] >= 0


@pytest.mark.slow
def test_bench_cli_peak_memory(tmp_path: Path) -> None:
    from delta_attnres.cli import main

    status = main(
        ["bench", "--quick", "--out", str(tmp_path), "--schemes", "standard,delta_block", "--depths", "none"]
    )

    result = json.loads((tmp_path / bench.RESULT_FILE).read_text())
    assert status == 0
    assert result["depth_sweep"] == []
    for figures in (result["schemes"]["delta_block"], result["schemes"]["delta_block"]["naive"]):
        assert figures["step_peak_bytes"] > 0
        assert math.isfinite(figures["step_peak_ratio"])


def test_bench_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown scheme"):
        bench.bench_config(schemes="standard,deltaa")


def test_bench_requires_standard() -> None:
    with pytest.raises(ValueError, match="must include 'standard'"):
        bench.bench_config(schemes="delta")
