"""Decoder tests against the independent reference in `reference.py`, plus routing and config checks.

Comparisons run the package model in float32 and the reference in float64 on the same weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import reference
import torch
import torch.nn.functional as F
from torch import Tensor

from delta_attnres.config import SCHEMES, ModelConfig, ResidualConfig
from delta_attnres.model import DecoderLM

LOGIT_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-5
# A mutated reference must differ from the model by far more than the comparison tolerance.
MUTATION_MARGIN = 1e-3

SIZES: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    max_seq_len=32,
    init_std=0.1,
)
# Qwen2/Qwen3 options: q/k/v bias, per-head q/k RMSNorm, an untied head and a head_dim != width / heads.
QWEN_OPTIONS: dict[str, Any] = dict(qk_norm=True, attention_bias=True, tie_embeddings=False, head_dim=12)

ROUTED_SCHEMES = [name for name in SCHEMES if name != "standard"]
BLOCK_SCHEMES = ("attnres_block", "delta_block")
REPLACEMENT_SCHEMES = ("attnres_full", "attnres_block", "attnres_cumulative")
ADDITIVE_SCHEMES = ("delta", "delta_block", "delta_cumulative")
BLOCK_COUNTS = (1, 2, 3, 6)


def routed_cases(with_gates: bool = True) -> list[Any]:
    """Return (scheme, num_blocks, gate) cases: every block count for block schemes, gates where allowed."""
    cases = []
    for scheme in ROUTED_SCHEMES:
        counts = BLOCK_COUNTS if scheme in BLOCK_SCHEMES else (1,)
        gates = (False, True) if with_gates and scheme in ADDITIVE_SCHEMES else (False,)
        for num_blocks in counts:
            for gate in gates:
                case_id = scheme
                if scheme in BLOCK_SCHEMES:
                    case_id += f"-{num_blocks}"
                if gate:
                    case_id += "-gate"
                cases.append(pytest.param(scheme, num_blocks, gate, id=case_id))
    return cases


def all_scheme_cases() -> list[Any]:
    """Return (scheme, num_blocks) cases for every scheme, standard included."""
    cases = [pytest.param("standard", 1, id="standard")]
    for scheme in ROUTED_SCHEMES:
        counts = BLOCK_COUNTS if scheme in BLOCK_SCHEMES else (1,)
        for num_blocks in counts:
            case_id = f"{scheme}-{num_blocks}" if scheme in BLOCK_SCHEMES else scheme
            cases.append(pytest.param(scheme, num_blocks, id=case_id))
    return cases


def make_config(scheme: str, num_blocks: int = 1, gate: bool = False, **changes: Any) -> ModelConfig:
    values = {**SIZES, **changes}
    return ModelConfig(**values, residual=ResidualConfig(scheme=scheme, num_blocks=num_blocks, gate=gate))


def randomize_routing(model: DecoderLM, seed: int = 1) -> None:
    """Give queries, gates, every RMSNorm gain and every bias non-trivial random values.

    The scales are moderate on purpose: sharper routing (query std 0.3, gains in [0.5, 1.5]) amplifies
    float32 rounding in attnres_full to about 5e-5 in the model's gradients (1.4e-5 when the reference
    itself runs in float32), which is above the 1e-5 tolerance.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".query"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".gate") or name.endswith("norm.weight"):
                param.copy_(0.75 + 0.5 * torch.rand(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def build_model(config: ModelConfig, seed: int = 0, randomize: bool = True) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(config)
    if randomize:
        randomize_routing(model, seed + 1)
    return model


def token_ids(config: ModelConfig, batch: int = 2, length: int = 8, seed: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


def reference_params(model: DecoderLM, requires_grad: bool = False) -> dict[str, Tensor]:
    """Return float64 copies of the model's state dict (tied weights become separate copies)."""
    params = {}
    for name, value in model.state_dict().items():
        params[name] = value.detach().double().clone().requires_grad_(requires_grad)
    return params


def language_model_loss(logits: Tensor, input_ids: Tensor) -> Tensor:
    targets = input_ids.roll(-1, dims=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def model_gradients(model: DecoderLM, input_ids: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    language_model_loss(model(input_ids), input_ids).backward()
    return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}


def assert_close_to_reference(actual: Tensor, expected: Tensor, tolerance: float, name: str) -> None:
    """Assert |actual - expected| <= tolerance * (1 + |expected|) elementwise."""
    torch.testing.assert_close(
        actual.detach().double(),
        expected.detach().double(),
        atol=tolerance,
        rtol=tolerance,
        msg=lambda message: f"{name}: {message}",
    )


def max_difference(a: Tensor, b: Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


class ListCache:
    """Minimal key/value cache with the `update` and `get_seq_length` methods of a Hugging Face Cache."""

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Any:
        if layer_idx in self.keys:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=-2)
        self.keys[layer_idx] = key_states
        self.values[layer_idx] = value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0


class WeightRecorder:
    """Stores every routing call of the model as (sublayer, weights, number of sources)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Tensor, int]] = []

    def record(self, sublayer: int, weights: Tensor, sources: tuple[Tensor, ...]) -> None:
        self.calls.append((sublayer, weights.detach().clone(), len(sources)))


# Standard decoder


@pytest.mark.parametrize("options", [{}, QWEN_OPTIONS], ids=["llama", "qwen"])
def test_standard_matches_plain_decoder(options: dict[str, Any]) -> None:
    config = make_config("standard", **options)
    model = build_model(config)
    ids = token_ids(config)

    with torch.no_grad():
        logits = model(ids)
    expected = reference.plain_decoder_logits(reference_params(model), config, ids)

    assert_close_to_reference(logits, expected, LOGIT_TOLERANCE, "logits")


@pytest.mark.parametrize("options", [{}, QWEN_OPTIONS], ids=["llama", "qwen"])
def test_standard_gradients_match_plain_decoder(options: dict[str, Any]) -> None:
    config = make_config("standard", **options)
    model = build_model(config)
    ids = token_ids(config)

    gradients = model_gradients(model, ids)
    params = reference_params(model, requires_grad=True)
    loss = language_model_loss(reference.plain_decoder_logits(params, config, ids), ids)
    loss.backward()

    assert set(gradients) == {name for name, _ in model.named_parameters()}
    for name, gradient in gradients.items():
        expected = params[name].grad
        assert expected is not None, f"reference gradient of {name} is missing"
        assert_close_to_reference(gradient, expected, GRAD_TOLERANCE, name)


# Behaviour at initialisation


@pytest.mark.parametrize(
    ("scheme", "num_blocks"),
    [
        pytest.param("delta", 1, id="delta"),
        pytest.param("attnres_full", 1, id="attnres_full"),
        *(pytest.param("attnres_block", n, id=f"attnres_block-{n}") for n in BLOCK_COUNTS),
    ],
)
def test_zero_queries_match_standard(scheme: str, num_blocks: int) -> None:
    """With zero queries the routed input is a positive multiple of h_l, which the pre-norm removes.

    The multiple is (1 + 1/n) for delta and 1/n for the replacement schemes, so the match is exact only
    up to the RMSNorm eps. A tiny eps keeps that effect far below the tolerance.
    """
    base_config = make_config("standard", init_std=0.02, rms_norm_eps=1e-12)
    base = build_model(base_config, randomize=False)
    routed = build_model(
        base_config.replace(residual={"scheme": scheme, "num_blocks": num_blocks}), randomize=False
    )
    result = routed.load_state_dict(base.state_dict(), strict=False)
    ids = token_ids(base_config)

    with torch.no_grad():
        expected = base(ids)
        logits = routed(ids)

    assert not result.unexpected_keys
    assert all("_router." in key for key in result.missing_keys)
    assert_close_to_reference(logits, expected, LOGIT_TOLERANCE, "logits")


@pytest.mark.parametrize("num_blocks", BLOCK_COUNTS)
def test_delta_block_zero_queries_differ(num_blocks: int) -> None:
    """Delta Block with zero queries is NOT the standard network.

    Its sources [e, Delta_1, ..., Delta_{c-1}] sum to the state at the start of the current block, not
    to h_l, so x_l = h_l + h(block start) / c is not a multiple of h_l once the block has begun.
    """
    base_config = make_config("standard", init_std=0.02, rms_norm_eps=1e-12)
    base = build_model(base_config, randomize=False)
    routed = build_model(
        base_config.replace(residual={"scheme": "delta_block", "num_blocks": num_blocks}), randomize=False
    )
    routed.load_state_dict(base.state_dict(), strict=False)
    ids = token_ids(base_config)

    with torch.no_grad():
        difference = max_difference(routed(ids), base(ids))

    assert difference > MUTATION_MARGIN


@pytest.mark.parametrize("scheme", ADDITIVE_SCHEMES)
def test_zero_gates_match_standard(scheme: str) -> None:
    """Zero gates make an additive scheme the plain residual network for any queries and any eps."""
    base_config = make_config("standard")
    base = build_model(base_config)
    gated = build_model(
        base_config.replace(residual={"scheme": scheme, "num_blocks": 3, "gate": True}), seed=5
    )
    gated.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for name, param in gated.named_parameters():
            if name.endswith(".gate"):
                param.zero_()
    ids = token_ids(base_config)

    with torch.no_grad():
        difference = max_difference(gated(ids), base(ids))

    assert difference <= LOGIT_TOLERANCE


# Agreement with the reference


@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), routed_cases())
def test_scheme_matches_reference(scheme: str, num_blocks: int, gate: bool) -> None:
    config = make_config(scheme, num_blocks, gate)
    model = build_model(config)
    ids = token_ids(config)

    with torch.no_grad():
        logits = model(ids)
    expected = reference.routed_decoder_logits(reference_params(model), config, ids)

    assert_close_to_reference(logits, expected, LOGIT_TOLERANCE, "logits")


@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), routed_cases())
def test_scheme_gradients_match_reference(scheme: str, num_blocks: int, gate: bool) -> None:
    config = make_config(scheme, num_blocks, gate)
    model = build_model(config)
    ids = token_ids(config)

    gradients = model_gradients(model, ids)
    params = reference_params(model, requires_grad=True)
    language_model_loss(reference.routed_decoder_logits(params, config, ids), ids).backward()

    assert set(gradients) == {name for name, _ in model.named_parameters()}
    for name, gradient in gradients.items():
        expected = params[name].grad
        assert expected is not None, f"reference gradient of {name} is missing"
        assert_close_to_reference(gradient, expected, GRAD_TOLERANCE, name)


@pytest.mark.parametrize("scheme", ROUTED_SCHEMES)
def test_scheme_qwen_options_match_reference(scheme: str) -> None:
    config = make_config(scheme, num_blocks=3, **QWEN_OPTIONS)
    model = build_model(config)
    ids = token_ids(config)

    with torch.no_grad():
        logits = model(ids)
    expected = reference.routed_decoder_logits(reference_params(model), config, ids)

    assert_close_to_reference(logits, expected, LOGIT_TOLERANCE, "logits")


@pytest.mark.parametrize("scheme", ROUTED_SCHEMES)
def test_naive_implementation_matches_reference(scheme: str) -> None:
    config = make_config(scheme, num_blocks=3).replace(residual={"implementation": "naive"})
    model = build_model(config)
    ids = token_ids(config)

    with torch.no_grad():
        logits = model(ids)
    expected = reference.routed_decoder_logits(reference_params(model), config, ids)

    assert_close_to_reference(logits, expected, LOGIT_TOLERANCE, "logits")


# Mutation checks: deliberately wrong references that the model must not match


def alternating_block_sources(
    e: Tensor, outputs: list[Tensor], states: list[Tensor], index: int, config: ModelConfig
) -> list[Tensor]:
    """Delta Block as the authors' code builds it: append `state - previous source` at each boundary.

    From the third block on, the sources are alternating sums (e + Delta_2, Delta_1 + Delta_3, ...).
    """
    size = reference.sublayers_per_block(config)
    sources = [e]
    for block in range(reference.block_of(config, index)):
        sources.append(states[(block + 1) * size] - sources[-1])
    return sources


def boundary_missing_last_block(rule: reference.SourceRule) -> reference.SourceRule:
    """Wrap `rule` so that the first sublayer of each block misses the block that has just completed."""

    def sources(
        e: Tensor, outputs: list[Tensor], states: list[Tensor], index: int, config: ModelConfig
    ) -> list[Tensor]:
        result = rule(e, outputs, states, index, config)
        starts_block = index % reference.sublayers_per_block(config) == 0
        return result[:-1] if starts_block and index > 0 else result

    return sources


def model_and_reference_difference(config: ModelConfig, **mutation: Any) -> tuple[float, float]:
    """Return the max logit difference of the model to the correct reference and to the mutated one."""
    model = build_model(config)
    ids = token_ids(config)
    params = reference_params(model)
    with torch.no_grad():
        logits = model(ids)
    correct = reference.routed_decoder_logits(params, config, ids)
    mutated = reference.routed_decoder_logits(params, config, ids, **mutation)
    return max_difference(logits, correct), max_difference(logits, mutated)


@pytest.mark.parametrize("num_blocks", [3, 6])
def test_mutation_alternating_block_sums(num_blocks: int) -> None:
    config = make_config("delta_block", num_blocks)

    to_correct, to_mutated = model_and_reference_difference(config, source_rule=alternating_block_sources)

    assert to_correct <= LOGIT_TOLERANCE
    assert to_mutated > MUTATION_MARGIN


@pytest.mark.parametrize("scheme", BLOCK_SCHEMES)
@pytest.mark.parametrize("num_blocks", [2, 3, 6])
def test_mutation_boundary_misses_last_block(scheme: str, num_blocks: int) -> None:
    config = make_config(scheme, num_blocks)
    mutated_rule = boundary_missing_last_block(reference.SOURCE_RULES[scheme])

    to_correct, to_mutated = model_and_reference_difference(config, source_rule=mutated_rule)

    assert to_correct <= LOGIT_TOLERANCE
    assert to_mutated > MUTATION_MARGIN


@pytest.mark.parametrize("scheme", REPLACEMENT_SCHEMES)
def test_mutation_missing_final_routing(scheme: str) -> None:
    config = make_config(scheme, num_blocks=3)

    to_correct, to_mutated = model_and_reference_difference(config, final_routing=False)

    assert to_correct <= LOGIT_TOLERANCE
    assert to_mutated > MUTATION_MARGIN


# Routing weights and sources


@pytest.mark.parametrize(("scheme", "num_blocks"), all_scheme_cases())
def test_source_counts_match_method(scheme: str, num_blocks: int) -> None:
    config = make_config(scheme, num_blocks)
    model = build_model(config)
    scheme_object = model.model.scheme

    for index in range(config.num_sublayers):
        expected = reference.expected_num_sources(config, index)
        assert scheme_object.num_sources(index) == expected, f"sublayer {index}"
    assert scheme_object.num_final_sources() == reference.expected_num_sources(config, config.num_sublayers)


@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), routed_cases())
def test_routers_exist_where_needed(scheme: str, num_blocks: int, gate: bool) -> None:
    """A router exists where a sublayer has at least two sources, or one source and a gate."""
    config = make_config(scheme, num_blocks, gate)
    model = build_model(config)
    routers: list[Any] = [
        router for layer in model.model.layers for router in (layer.attn_router, layer.mlp_router)
    ]
    routers.append(model.model.final_router)

    for index, router in enumerate(routers):
        count = reference.expected_num_sources(config, index)
        needed = count >= 2 or (count == 1 and gate)
        assert (router is not None) == needed, f"sublayer {index} with {count} sources"
        if router is not None:
            assert router.num_sources == count, f"sublayer {index}"
            assert hasattr(router, "query") == (count >= 2), f"sublayer {index}"


@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), routed_cases())
def test_recorded_weights_match_reference(scheme: str, num_blocks: int, gate: bool) -> None:
    config = make_config(scheme, num_blocks, gate)
    model = build_model(config)
    ids = token_ids(config)
    recorder = WeightRecorder()
    expected = reference.Recorder()

    with torch.no_grad():
        model(ids, recorder=recorder)
    reference.routed_decoder_logits(reference_params(model), config, ids, recorder=expected)

    assert [call[0] for call in recorder.calls] == [call[0] for call in expected.calls]
    for (index, weights, count), (_, expected_weights, _) in zip(recorder.calls, expected.calls, strict=True):
        assert weights.dtype == torch.float32, f"sublayer {index}"
        assert weights.shape == (reference.expected_num_sources(config, index), *ids.shape), (
            f"sublayer {index}"
        )
        assert count == weights.shape[0], f"sublayer {index}"
        assert_close_to_reference(weights, expected_weights, 1e-5, f"weights of sublayer {index}")


@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), routed_cases(with_gates=False))
def test_routing_weights_sum_to_one(scheme: str, num_blocks: int, gate: bool) -> None:
    config = make_config(scheme, num_blocks, gate)
    model = build_model(config)
    recorder = WeightRecorder()

    with torch.no_grad():
        model(token_ids(config), recorder=recorder)

    routed = [i for i in range(config.num_sublayers + 1) if reference.expected_num_sources(config, i) >= 2]
    assert [call[0] for call in recorder.calls] == routed
    for index, weights, _ in recorder.calls:
        assert torch.allclose(weights.sum(0), torch.ones(()), atol=1e-6), f"sublayer {index}"
        assert bool((weights >= 0).all()), f"sublayer {index}"


@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), routed_cases(with_gates=False))
def test_every_query_changes_logits(scheme: str, num_blocks: int, gate: bool) -> None:
    config = make_config(scheme, num_blocks, gate)
    model = build_model(config)
    ids = token_ids(config)
    generator = torch.Generator().manual_seed(11)
    queries = [(name, param) for name, param in model.named_parameters() if name.endswith(".query")]
    routed = [i for i in range(config.num_sublayers + 1) if reference.expected_num_sources(config, i) >= 2]

    assert len(queries) == len(routed)
    with torch.no_grad():
        baseline = model(ids)
        for name, query in queries:
            original = query.clone()
            query.add_(0.5 * torch.randn(query.shape, generator=generator))
            difference = max_difference(model(ids), baseline)
            query.copy_(original)
            assert difference > 1e-4, f"changing {name} left the logits unchanged"


# Gradients


@pytest.mark.parametrize(("scheme", "num_blocks", "gate"), routed_cases())
def test_every_parameter_gets_gradient(scheme: str, num_blocks: int, gate: bool) -> None:
    config = make_config(scheme, num_blocks, gate, **QWEN_OPTIONS)
    model = build_model(config, randomize=False)  # queries at their zero initialisation
    ids = token_ids(config)

    language_model_loss(model(ids), ids).backward()

    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        assert bool(torch.isfinite(param.grad).all()), f"{name} has a non-finite gradient"


@pytest.mark.parametrize(("scheme", "num_blocks"), all_scheme_cases())
def test_gradient_checkpointing_same_gradients(scheme: str, num_blocks: int) -> None:
    config = make_config(scheme, num_blocks)
    model = build_model(config)
    model.train()
    ids = token_ids(config)

    expected = model_gradients(model, ids)
    model.set_gradient_checkpointing(True)
    gradients = model_gradients(model, ids)

    assert set(gradients) == set(expected)
    for name, gradient in gradients.items():
        assert_close_to_reference(gradient, expected[name], 1e-6, name)


def test_gradient_checkpointing_records_once() -> None:
    """The recompute in backward must not hand the recorder a second copy of every routing call."""
    config = make_config("delta")
    model = build_model(config)
    model.train()
    model.set_gradient_checkpointing(True)
    ids = token_ids(config)
    recorder = WeightRecorder()

    loss = language_model_loss(model(ids, recorder=recorder), ids)
    forward_calls = len(recorder.calls)
    loss.backward()

    assert forward_calls == config.num_sublayers - 1
    assert len(recorder.calls) == forward_calls


# Cached decoding


@pytest.mark.parametrize(("scheme", "num_blocks"), all_scheme_cases())
def test_cached_decoding_matches_full_forward(scheme: str, num_blocks: int) -> None:
    config = make_config(scheme, num_blocks)
    model = build_model(config)
    model.eval()
    ids = token_ids(config, length=10)
    cache = ListCache()

    with torch.no_grad():
        expected = model(ids)
        prefix = model(ids[:, :4], cache=cache)
        steps = [model(ids[:, position : position + 1], cache=cache) for position in range(4, ids.shape[1])]
    logits = torch.cat([prefix, *steps], dim=1)

    assert cache.get_seq_length(0) == ids.shape[1]
    assert_close_to_reference(logits, expected, LOGIT_TOLERANCE, "logits")


# Configuration validation

SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "max_seq_len",
)

INVALID_CONFIGS: list[Any] = [
    pytest.param(
        lambda: ResidualConfig(scheme="deltaa"),
        "residual.scheme = 'deltaa'",
        "one of standard, attnres_full",
        id="unknown-scheme",
    ),
    pytest.param(
        lambda: ModelConfig(**SIZES, residual=ResidualConfig(scheme="delta_block", num_blocks=4)),
        "residual.num_blocks = 4",
        "a divisor of num_layers=6",
        id="delta-block-count",
    ),
    pytest.param(
        lambda: ModelConfig(**SIZES, residual=ResidualConfig(scheme="attnres_block", num_blocks=5)),
        "residual.num_blocks = 5",
        "a divisor of num_layers=6",
        id="attnres-block-count",
    ),
    pytest.param(
        lambda: ResidualConfig(num_blocks=0),
        "residual.num_blocks = 0",
        "a positive integer",
        id="zero-blocks",
    ),
    *(
        pytest.param(
            lambda field=field, value=value: ModelConfig(**{**SIZES, field: value}),
            f"model.{field} = {value}",
            "a positive integer",
            id=f"{field}={value}",
        )
        for field in SIZE_FIELDS
        for value in (0, -2)
    ),
    *(
        pytest.param(
            lambda field=field: ModelConfig(**{**SIZES, field: 0.0}),
            f"model.{field} = 0.0",
            "a positive number",
            id=f"{field}=0.0",
        )
        for field in ("rope_theta", "rms_norm_eps", "init_std")
    ),
    pytest.param(
        lambda: ModelConfig(**{**SIZES, "hidden_size": 30}),
        "model.num_heads = 4",
        "a divisor of hidden_size=30",
        id="heads-not-dividing-width",
    ),
    pytest.param(
        lambda: ModelConfig(**{**SIZES, "num_kv_heads": 3}),
        "model.num_kv_heads = 3",
        "a divisor of num_heads=4",
        id="kv-heads-not-dividing-heads",
    ),
    pytest.param(
        lambda: ModelConfig(**{**SIZES, "head_dim": 7}),
        "model.head_dim = 7",
        "an even number",
        id="odd-head-dim",
    ),
    *(
        pytest.param(
            lambda scheme=scheme: ResidualConfig(scheme=scheme, gate=True),
            "residual.gate = True",
            f"False for scheme '{scheme}'",
            id=f"gate-{scheme}",
        )
        for scheme in ("standard", *REPLACEMENT_SCHEMES)
    ),
    pytest.param(
        lambda: ResidualConfig(implementation="triton"),
        "residual.implementation = 'triton'",
        "'fused' or 'naive'",
        id="unknown-implementation",
    ),
    pytest.param(
        lambda: ModelConfig.from_dict({**SIZES, "hidden_sise": 32}),
        "hidden_sise",
        "known fields: ",
        id="unknown-model-field",
    ),
    pytest.param(
        lambda: ModelConfig.from_dict({**SIZES, "residual": {"shceme": "delta"}}),
        "shceme",
        "known fields: ",
        id="unknown-residual-field",
    ),
]


@pytest.mark.parametrize(("build", "field_and_value", "allowed"), INVALID_CONFIGS)
def test_invalid_config_raises(build: Callable[[], Any], field_and_value: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field_and_value)) as raised:
        build()

    assert allowed in str(raised.value)


def test_config_replace_validates() -> None:
    config = make_config("delta_block", num_blocks=3)

    with pytest.raises(ValueError, match=re.escape("residual.num_blocks = 4")):
        config.replace(residual={"num_blocks": 4})


def test_config_round_trip() -> None:
    config = make_config("delta_block", num_blocks=3, gate=True, **QWEN_OPTIONS)

    restored = ModelConfig.from_dict(config.to_dict())

    assert restored == config
    assert dataclasses.asdict(restored.residual) == dataclasses.asdict(config.residual)
