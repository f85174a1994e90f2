"""Tests of the depth router: the fused `route` kernel, `naive_route` and the `Router` module."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from delta_attnres.model import Router
from delta_attnres.routing import inverse_rms, naive_route, route

EPS = 1e-6
WIDTH = 8


def make_inputs(
    num_sources: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Return a query, a key-norm gain and sources (2, 3, WIDTH) of different scales."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(WIDTH, generator=generator, dtype=dtype)
    gain = 0.5 + torch.rand(WIDTH, generator=generator, dtype=dtype)
    sources = [
        (index + 1) * torch.randn(2, 3, WIDTH, generator=generator, dtype=dtype)
        for index in range(num_sources)
    ]
    return query, gain, sources


def fused_mix(query: Tensor, gain: Tensor, *sources: Tensor) -> Tensor:
    """Run `route` with the inverse RMS computed here, so that gradients also flow through it."""
    inv_rms = [inverse_rms(source, EPS) for source in sources]
    mixed, _ = route(query, gain, list(sources), inv_rms)
    return mixed


def naive_mix(query: Tensor, gain: Tensor, *sources: Tensor) -> Tensor:
    mixed, _ = naive_route(query, gain, list(sources), EPS)
    return mixed


@pytest.mark.parametrize("num_sources", [1, 2, 5])
def test_route_gradcheck(num_sources: int) -> None:
    query, gain, sources = make_inputs(num_sources)
    inputs = [tensor.requires_grad_() for tensor in (query, gain, *sources)]

    assert torch.autograd.gradcheck(fused_mix, inputs)


def test_route_gradients_match_naive_route() -> None:
    query, gain, sources = make_inputs(4)
    inputs = [tensor.requires_grad_() for tensor in (query, gain, *sources)]
    upstream = torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    fused = torch.autograd.grad((fused_mix(*inputs) * upstream).sum(), inputs)
    naive = torch.autograd.grad((naive_mix(*inputs) * upstream).sum(), inputs)

    for index, (fused_grad, naive_grad) in enumerate(zip(fused, naive, strict=True)):
        difference = (fused_grad - naive_grad).abs().max().item()
        assert difference < 1e-10, f"gradient of input {index} differs from naive_route by {difference:.3g}"


def test_route_matches_naive_route() -> None:
    query, gain, sources = make_inputs(4, dtype=torch.float32)

    mixed, weights = route(query, gain, sources, [inverse_rms(source, EPS) for source in sources])
    expected_mixed, expected_weights = naive_route(query, gain, sources, EPS)

    torch.testing.assert_close(mixed, expected_mixed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-6)


def test_route_weights_sum_to_one() -> None:
    query, gain, sources = make_inputs(5, dtype=torch.float32)

    _, weights = route(query, gain, sources, [inverse_rms(source, EPS) for source in sources])

    assert weights.shape == (5, 2, 3)
    torch.testing.assert_close(weights.sum(0), torch.ones(2, 3))
    assert bool((weights >= 0).all())


def test_route_weights_detached() -> None:
    query, gain, sources = make_inputs(3, dtype=torch.float32)
    query.requires_grad_()

    mixed, weights = route(query, gain, sources, [inverse_rms(source, EPS) for source in sources])

    assert mixed.requires_grad
    assert not weights.requires_grad


def test_route_single_source_returns_source() -> None:
    query, gain, sources = make_inputs(1, dtype=torch.float32)

    mixed, weights = route(query, gain, sources, [inverse_rms(sources[0], EPS)])

    torch.testing.assert_close(mixed, sources[0])
    torch.testing.assert_close(weights, torch.ones(1, 2, 3))


def test_route_zero_query_uniform_weights() -> None:
    _, gain, sources = make_inputs(4, dtype=torch.float32)

    mixed, weights = route(
        torch.zeros(WIDTH), gain, sources, [inverse_rms(source, EPS) for source in sources]
    )

    torch.testing.assert_close(weights, torch.full((4, 2, 3), 0.25))
    torch.testing.assert_close(mixed, torch.stack(sources).mean(0))


def test_route_autocast_dtypes() -> None:
    query, gain, sources = make_inputs(3, dtype=torch.float32)
    low = [source.bfloat16().requires_grad_() for source in sources]
    query.requires_grad_()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, weights = route(query, gain, low, [inverse_rms(source, EPS) for source in low])
    mixed.float().sum().backward()

    assert mixed.dtype == torch.bfloat16
    assert weights.dtype == torch.float32
    assert query.grad is not None
    assert query.grad.dtype == torch.float32
    for source in low:
        assert source.grad is not None
        assert source.grad.dtype == torch.bfloat16


def test_route_autocast_weights_in_float32() -> None:
    """Under autocast the routing logits and softmax must still be float32, as the kernel widens them.

    The sources are bfloat16 values, so a float32 computation on them is exact up to float32 rounding.
    """
    query, gain, sources = make_inputs(3, dtype=torch.float32)
    low = [source.bfloat16() for source in sources]
    _, expected = naive_route(query, gain, [source.float() for source in low], EPS)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weights = route(query, gain, low, [inverse_rms(source, EPS) for source in low])

    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)


def test_naive_route_autocast_weights_in_float32() -> None:
    query, gain, sources = make_inputs(3, dtype=torch.float32)
    low = [source.bfloat16() for source in sources]
    _, expected = naive_route(query, gain, [source.float() for source in low], EPS)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, weights = naive_route(query, gain, low, EPS)

    assert mixed.dtype == torch.bfloat16
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)


def test_inverse_rms_values() -> None:
    _, _, sources = make_inputs(1, dtype=torch.float32)
    source = sources[0].bfloat16()

    result = inverse_rms(source, EPS)

    assert result.dtype == torch.float32
    torch.testing.assert_close(result, 1 / torch.sqrt(source.float().pow(2).mean(-1) + EPS))


@pytest.mark.parametrize("implementation", ["fused", "naive"])
def test_router_mix_matches_naive_route(implementation: str) -> None:
    query, gain, sources = make_inputs(3, dtype=torch.float32)
    router = Router(WIDTH, 3, EPS, gate=False, implementation=implementation)
    with torch.no_grad():
        router.query.copy_(query)
        router.key_norm.weight.copy_(gain)

    mixed, weights = router.mix(sources, [inverse_rms(source, EPS) for source in sources])
    expected_mixed, expected_weights = naive_route(query, gain, sources, EPS)

    torch.testing.assert_close(mixed, expected_mixed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-6)


def test_router_rejects_wrong_source_count() -> None:
    _, _, sources = make_inputs(2, dtype=torch.float32)
    router = Router(WIDTH, 3, EPS, gate=False, implementation="fused")

    with pytest.raises(RuntimeError, match="built for 3 sources received 2"):
        router.mix(sources, [inverse_rms(source, EPS) for source in sources])


def test_router_single_source_holds_only_gate() -> None:
    """A one-source router has no query to learn because its weight is always 1. It only holds a gate.

    The schemes pass the single source through without calling `mix`, and the model tests cover that path.
    """
    router = Router(WIDTH, 1, EPS, gate=True, implementation="fused")

    assert [name for name, _ in router.named_parameters()] == ["gate"]
    assert router.gate is not None
    assert router.gate.item() == 0.0


def test_router_initial_values() -> None:
    router = Router(WIDTH, 4, EPS, gate=True, implementation="fused")

    assert bool((router.query == 0).all())
    assert bool((router.key_norm.weight == 1).all())
    assert router.gate is not None
    assert router.gate.item() == 0.0
