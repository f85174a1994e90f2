"""Residual schemes: what each sublayer reads, and how the stream advances after it.

A scheme is chosen once, when the model is built, from `ResidualConfig`. It owns no parameters: the
routers live in the layers, so per-layer wrapping (FSDP, activation checkpointing) covers them. Every
scheme implements the same four methods, which the decoder calls in order:

    stream = scheme.begin(embeddings)
    for each sublayer l:   x = scheme.sublayer_input(stream, l, router, norm)
                           stream = scheme.advance(stream, l, sublayer(x))
    hidden = scheme.output(stream, final_router, final_norm)

`sublayer_input` and `output` apply the given pre-norm themselves, so replacement routing can fuse it
with the routing (`Router.mix_norm`).

Streams are immutable, so a layer can be recomputed under activation checkpointing.

Sublayers are numbered from 0 here (METHOD-style formulas number them from 1): sublayer 2i is the
attention of layer i, sublayer 2i + 1 its MLP. A sublayer's *output* is v_l = f_l(x_l); the embedding
e is source 0 of every scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from .config import ModelConfig
from .routing import inverse_rms

if TYPE_CHECKING:
    from .model import RMSNorm, Router


class RoutingRecorder(Protocol):
    """Receives the routing weights of every router call; used by the analysis tools."""

    def record(self, sublayer: int, weights: Tensor, sources: tuple[Tensor, ...]) -> None: ...


@dataclass(frozen=True)
class Stream:
    """What the decoder carries from one sublayer to the next.

    `hidden` is the residual stream h (None under replacement routing, which has no stream).
    `sources` are the completed sources with their inverse RMS, computed once when each is produced.
    `partial` is the running sum of outputs inside the current block (block sources only).
    """

    hidden: Tensor | None
    sources: tuple[Tensor, ...] = ()
    inv_rms: tuple[Tensor, ...] = ()
    partial: Tensor | None = None
    partial_inv_rms: Tensor | None = None
    recorder: RoutingRecorder | None = None


class ResidualScheme:
    """The plain pre-norm residual: x_l = h_l, h_{l+1} = h_l + v_l."""

    def __init__(self, config: ModelConfig) -> None:
        self.num_sublayers = config.num_sublayers
        self.eps = config.rms_norm_eps

    def num_sources(self, sublayer: int) -> int:
        """Number of sources that `sublayer` routes over (0 for unrouted schemes)."""
        return 0

    def num_final_sources(self) -> int:
        """Number of sources of the final routing before the output norm (0 when there is none)."""
        return 0

    def begin(self, embeddings: Tensor, recorder: RoutingRecorder | None = None) -> Stream:
        return Stream(hidden=embeddings, recorder=recorder)

    def sublayer_input(self, stream: Stream, sublayer: int, router: Router | None, norm: RMSNorm) -> Tensor:
        """Return the normalised input of `sublayer`: `norm` applied to what the scheme routes to it."""
        assert stream.hidden is not None
        return norm(stream.hidden)

    def advance(self, stream: Stream, sublayer: int, output: Tensor) -> Stream:
        assert stream.hidden is not None
        return replace(stream, hidden=stream.hidden + output)

    def output(self, stream: Stream, router: Router | None, norm: RMSNorm) -> Tensor:
        """Return the final hidden states after the output norm `norm`."""
        assert stream.hidden is not None
        return norm(stream.hidden)


class SourceRule:
    """Which sources exist at each sublayer; subclasses define the source axis."""

    def __init__(self, config: ModelConfig) -> None:
        self.num_sublayers = config.num_sublayers
        self.eps = config.rms_norm_eps

    def count(self, sublayer: int) -> int:
        raise NotImplementedError

    def final_count(self) -> int:
        raise NotImplementedError

    def read(self, stream: Stream, sublayer: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Return the sources of `sublayer` and their inverse RMS."""
        return stream.sources, stream.inv_rms

    def read_final(self, stream: Stream) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return stream.sources, stream.inv_rms

    def push(self, stream: Stream, sublayer: int, output: Tensor) -> Stream:
        raise NotImplementedError

    def _append(self, stream: Stream, source: Tensor) -> Stream:
        return replace(
            stream,
            sources=(*stream.sources, source),
            inv_rms=(*stream.inv_rms, inverse_rms(source, self.eps)),
        )


class SublayerSources(SourceRule):
    """Sources [e, v_1, ..., v_{l-1}]: the embedding and every earlier sublayer output."""

    def count(self, sublayer: int) -> int:
        return sublayer + 1

    def final_count(self) -> int:
        return self.num_sublayers + 1

    def push(self, stream: Stream, sublayer: int, output: Tensor) -> Stream:
        return self._append(stream, output)


class CumulativeSources(SourceRule):
    """Sources [h_1, ..., h_l]: the running states e + v_1 + ... (the redundant sources of the ablation)."""

    def count(self, sublayer: int) -> int:
        return sublayer + 1

    def final_count(self) -> int:
        return self.num_sublayers + 1

    def push(self, stream: Stream, sublayer: int, output: Tensor) -> Stream:
        return self._append(stream, stream.sources[-1] + output)


class BlockSources(SourceRule):
    """Sources [e, b_1, ..., b_{c-1}]: the embedding and the output sum of every completed block.

    With `with_partial` (replacement routing, which has no stream to carry the current block), the
    running sum p of the current block is appended once it is non-empty, and it resets at each block.
    """

    def __init__(self, config: ModelConfig, with_partial: bool) -> None:
        super().__init__(config)
        self.num_blocks = config.residual.num_blocks
        self.block_size = self.num_sublayers // self.num_blocks  # sublayers per block
        self.with_partial = with_partial

    def count(self, sublayer: int) -> int:
        block, position = divmod(sublayer, self.block_size)
        return block + 1 + (1 if self.with_partial and position > 0 else 0)

    def final_count(self) -> int:
        return self.num_blocks + 1

    def read(self, stream: Stream, sublayer: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        if self.with_partial and stream.partial is not None:
            assert stream.partial_inv_rms is not None
            return (*stream.sources, stream.partial), (*stream.inv_rms, stream.partial_inv_rms)
        return stream.sources, stream.inv_rms

    def push(self, stream: Stream, sublayer: int, output: Tensor) -> Stream:
        partial = output if stream.partial is None else stream.partial + output
        if (sublayer + 1) % self.block_size == 0:
            return replace(self._append(stream, partial), partial=None, partial_inv_rms=None)
        partial_inv_rms = inverse_rms(partial, self.eps) if self.with_partial else None
        return replace(stream, partial=partial, partial_inv_rms=partial_inv_rms)


class RoutedScheme(ResidualScheme):
    """Base of the routed schemes; subclasses choose how the routed mix enters the sublayer."""

    def __init__(self, config: ModelConfig, rule: SourceRule) -> None:
        super().__init__(config)
        self.rule = rule

    def num_sources(self, sublayer: int) -> int:
        return self.rule.count(sublayer)

    def begin(self, embeddings: Tensor, recorder: RoutingRecorder | None = None) -> Stream:
        stream = Stream(hidden=self._initial_hidden(embeddings), recorder=recorder)
        return self.rule._append(stream, embeddings)

    def _initial_hidden(self, embeddings: Tensor) -> Tensor | None:
        raise NotImplementedError

    def _route(
        self,
        stream: Stream,
        sublayer: int,
        router: Router | None,
        sources: tuple[Tensor, ...],
        inv_rms: tuple[Tensor, ...],
        norm: RMSNorm | None = None,
    ) -> Tensor:
        """Return the routed mix of `sources`, or `norm` applied to it (fused with the routing) if given."""
        if router is None or router.num_sources == 1:
            # One source: its weight is 1 and the router has no query to learn.
            return sources[0] if norm is None else norm(sources[0])
        if norm is None:
            mixed, weights = router.mix(sources, inv_rms)
        else:
            mixed, weights = router.mix_norm(sources, inv_rms, norm)
        if stream.recorder is not None:
            stream.recorder.record(sublayer, weights, sources)
        return mixed

    def advance(self, stream: Stream, sublayer: int, output: Tensor) -> Stream:
        stream = self.rule.push(stream, sublayer, output)
        if stream.hidden is not None:
            stream = replace(stream, hidden=stream.hidden + output)
        return stream


class ReplacementRouting(RoutedScheme):
    """x_l = route(sources); no residual stream, and a final routing feeds the output norm (AttnRes)."""

    def _initial_hidden(self, embeddings: Tensor) -> Tensor | None:
        return None

    def num_final_sources(self) -> int:
        return self.rule.final_count()

    def sublayer_input(self, stream: Stream, sublayer: int, router: Router | None, norm: RMSNorm) -> Tensor:
        sources, inv_rms = self.rule.read(stream, sublayer)
        return self._route(stream, sublayer, router, sources, inv_rms, norm)

    def output(self, stream: Stream, router: Router | None, norm: RMSNorm) -> Tensor:
        sources, inv_rms = self.rule.read_final(stream)
        return self._route(stream, self.num_sublayers, router, sources, inv_rms, norm)


class AdditiveRouting(RoutedScheme):
    """x_l = h_l + [gate *] route(sources); the residual stream is kept and there is no final routing."""

    def _initial_hidden(self, embeddings: Tensor) -> Tensor | None:
        return embeddings

    def sublayer_input(self, stream: Stream, sublayer: int, router: Router | None, norm: RMSNorm) -> Tensor:
        assert stream.hidden is not None
        sources, inv_rms = self.rule.read(stream, sublayer)
        mixed = self._route(stream, sublayer, router, sources, inv_rms)
        if router is not None and router.gate is not None:
            mixed = router.gate * mixed
        return norm(stream.hidden + mixed)


def build_scheme(config: ModelConfig) -> ResidualScheme:
    """Build the scheme object named by `config.residual`."""
    sources, routing = config.residual.sources, config.residual.routing
    if routing == "none":
        return ResidualScheme(config)
    rule: SourceRule
    if sources == "sublayer":
        rule = SublayerSources(config)
    elif sources == "cumulative":
        rule = CumulativeSources(config)
    else:
        rule = BlockSources(config, with_partial=routing == "replacement")
    return ReplacementRouting(config, rule) if routing == "replacement" else AdditiveRouting(config, rule)
