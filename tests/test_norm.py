"""Tests of the single-node RMSNorm and the fused route-and-norm kernel against the reference decoder."""

from __future__ import annotations

import pytest
import reference
import torch
from torch import Tensor

from delta_attnres import routing
from delta_attnres.norm import rms_norm
from delta_attnres.routing import inverse_rms, route_norm

EPS = 1e-6
WIDTH = 8


def make_inputs(num_sources: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, Tensor]:
    """Return a query, a key-norm gain, a pre-norm weight and sources (2, 3, WIDTH) of different scales."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "query": torch.randn(WIDTH, generator=generator, dtype=dtype),
        "gain": 0.5 + torch.rand(WIDTH, generator=generator, dtype=dtype),
        "norm_weight": 0.5 + torch.rand(WIDTH, generator=generator, dtype=dtype),
    }
    for index in range(num_sources):
        tensors[f"source{index}"] = (index + 1) * torch.randn(2, 3, WIDTH, generator=generator, dtype=dtype)
    return tensors


def fused_route_norm(query: Tensor, gain: Tensor, norm_weight: Tensor, *sources: Tensor) -> Tensor:
    inv_rms = [inverse_rms(source, EPS) for source in sources]
    normed, _ = route_norm(query, gain, list(sources), inv_rms, norm_weight, EPS)
    return normed


def reference_route_norm(query: Tensor, gain: Tensor, norm_weight: Tensor, *sources: Tensor) -> Tensor:
    params = {"router.query": query, "router.key_norm.weight": gain}
    mixed, _ = reference.route(params, "router", list(sources), EPS)
    return reference.rms_norm(mixed, norm_weight, EPS)


def new_saved_shapes(run: object, live: tuple[Tensor, ...]) -> list[tuple[int, ...]]:
    """Return the shapes of the tensors that `run()` saves for backward, beyond those in `live`."""
    live_storages = {tensor.untyped_storage().data_ptr() for tensor in live}
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: Tensor) -> Tensor:
        if tensor.untyped_storage().data_ptr() not in live_storages:
            shapes.append(tuple(tensor.shape))
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()  # type: ignore[operator]
    return sorted(shapes)


def test_rms_norm_gradcheck() -> None:
    inputs = make_inputs(1)
    x = inputs["source0"].requires_grad_()
    weight = inputs["norm_weight"].requires_grad_()

    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, EPS), (x, weight))


def test_rms_norm_matches_reference() -> None:
    inputs = make_inputs(1)
    x = inputs["source0"].requires_grad_()
    weight = inputs["norm_weight"].requires_grad_()
    upstream = torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    output = rms_norm(x, weight, EPS)
    expected = reference.rms_norm(x, weight, EPS)
    grads = torch.autograd.grad((output * upstream).sum(), (x, weight))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, weight))

    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], expected_grads[1], rtol=1e-10, atol=1e-12)


def test_rms_norm_saves_only_inverse_rms() -> None:
    inputs = make_inputs(1, torch.float32)
    x = inputs["source0"].requires_grad_()
    weight = inputs["norm_weight"].requires_grad_()

    shapes = new_saved_shapes(lambda: rms_norm(x, weight, EPS), (x, weight))

    assert shapes == [(2, 3, 1)]


def test_rms_norm_bf16_input() -> None:
    inputs = make_inputs(1, torch.float32)
    x = inputs["source0"].bfloat16().requires_grad_()
    weight = inputs["norm_weight"].requires_grad_()

    output = rms_norm(x, weight, EPS)
    output.sum().backward()

    assert output.dtype == torch.float32  # float32 gain times the bf16 normalised input, as in Llama
    assert x.grad is not None
    assert x.grad.dtype == torch.bfloat16
    assert weight.grad is not None
    assert weight.grad.dtype == torch.float32


@pytest.mark.parametrize("num_sources", [2, 5])
def test_route_norm_gradcheck(num_sources: int) -> None:
    inputs = [tensor.requires_grad_() for tensor in make_inputs(num_sources).values()]

    assert torch.autograd.gradcheck(fused_route_norm, inputs)


def test_route_norm_matches_reference() -> None:
    inputs = [tensor.requires_grad_() for tensor in make_inputs(4).values()]
    upstream = torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    output = fused_route_norm(*inputs)
    expected = reference_route_norm(*inputs)
    grads = torch.autograd.grad((output * upstream).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)

    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-12)
    for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        difference = (grad - expected_grad).abs().max().item()
        assert difference < 1e-10, f"gradient of input {index} differs from the reference by {difference:.3g}"


def test_route_norm_saves_no_mix() -> None:
    """Beyond live tensors, route_norm saves the (S, B, T) logits, the (D,) query and the (B, T, 1) norm statistic."""
    inputs = make_inputs(5, torch.float32)
    query, gain, norm_weight = inputs["query"], inputs["gain"], inputs["norm_weight"]
    sources = [inputs[f"source{index}"].requires_grad_() for index in range(5)]
    inv_rms = [inverse_rms(source, EPS) for source in sources]

    shapes = new_saved_shapes(
        lambda: route_norm(query, gain, sources, inv_rms, norm_weight, EPS),
        (query, gain, norm_weight, *sources, *inv_rms),
    )

    assert shapes == [(2, 3, 1), (5, 2, 3), (WIDTH,)]


def test_route_norm_bf16_autocast() -> None:
    inputs = make_inputs(3, torch.float32)
    sources = [inputs[f"source{index}"].bfloat16().requires_grad_() for index in range(3)]
    norm_weight = inputs["norm_weight"].bfloat16().requires_grad_()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        inv_rms = [inverse_rms(source, EPS) for source in sources]
        normed, weights = route_norm(inputs["query"], inputs["gain"], sources, inv_rms, norm_weight, EPS)
    normed.float().sum().backward()

    assert normed.dtype == torch.bfloat16
    assert weights.dtype == torch.float32
    assert norm_weight.grad is not None
    assert norm_weight.grad.dtype == torch.bfloat16
    for source in sources:
        assert source.grad is not None
        assert source.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("length", [1, 3])
def test_inference_paths_match_reference(length: int) -> None:
    """Without autograd, small inputs take the stacked path; large ones the fused kernel. Both match."""
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(WIDTH, generator=generator, dtype=torch.float64)
    gain = 0.5 + torch.rand(WIDTH, generator=generator, dtype=torch.float64)
    norm_weight = 0.5 + torch.rand(WIDTH, generator=generator, dtype=torch.float64)
    sources = [
        (index + 1) * torch.randn(2, length, WIDTH, generator=generator, dtype=torch.float64)
        for index in range(4)
    ]
    params = {"router.query": query, "router.key_norm.weight": gain}
    expected_mix, expected_weights = reference.route(params, "router", sources, EPS)
    expected_norm = reference.rms_norm(expected_mix, norm_weight, EPS)

    for max_elements in (2**20, 0):  # 0 sends every call to the fused kernel
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(routing, "_STACKED_MAX_ELEMENTS", max_elements)
            inv_rms = [inverse_rms(source, EPS) for source in sources]
            mixed, weights = routing.route(query, gain, sources, inv_rms)
            normed, norm_weights = route_norm(query, gain, sources, inv_rms, norm_weight, EPS)

        torch.testing.assert_close(mixed, expected_mix, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weights, expected_weights.to(weights.dtype), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(normed, expected_norm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm_weights, weights)


def test_stacked_path_only_without_autograd() -> None:
    sources = [torch.randn(1, 1, WIDTH) for _ in range(3)]

    assert not routing._use_stacked(sources)
    with torch.no_grad():
        assert routing._use_stacked(sources)
        assert not routing._use_stacked([torch.randn(64, 1024, WIDTH) for _ in range(3)])
