"""Routing statistics: how sharply each routed sublayer mixes its sources, and how alike the sources are.

`trace_routing` runs a model on some token batches with a recorder attached and returns a typed
`RoutingTrace`; plotting code reads that result and never reruns the model. Without a recorder the model
does no extra work, and the recorder keeps only running float sums, detached from autograd.

Per routed sublayer, averaged over tokens: the number of sources n, the max weight, the entropy
H = -sum alpha log alpha, H / log n, the effective number of sources exp(H), and the mean weight of every
source. Per source set: the mean cosine similarity of adjacent sources, and the effective rank
(exp of the entropy of the normalised singular values; Roy and Vetterli, 2007) on a sample of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .model import DecoderLM

RANK_SAMPLE_TOKENS = 64  # tokens per call used for the effective rank (an SVD per token)


def sublayer_label(sublayer: int, num_sublayers: int) -> str:
    """Name a 0-based sublayer: "3.attn", "3.mlp", or "final" for the final routing."""
    if sublayer == num_sublayers:
        return "final"
    layer, kind = divmod(sublayer, 2)
    return f"{layer}.{'attn' if kind == 0 else 'mlp'}"


@dataclass
class SublayerRouting:
    """Token-averaged routing statistics of one routed sublayer."""

    sublayer: int
    label: str
    num_sources: int
    max_weight: float
    entropy: float
    normalized_entropy: float
    effective_sources: float
    mean_weights: list[float]
    adjacent_cosine: float
    effective_rank: float

    @property
    def uniform_weight(self) -> float:
        return 1.0 / self.num_sources


@dataclass
class RoutingTrace:
    """Routing statistics of one model on some text; empty for the standard scheme."""

    scheme: str
    num_tokens: int
    sublayers: list[SublayerRouting] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RoutingTrace:
        return cls(
            scheme=values["scheme"],
            num_tokens=values["num_tokens"],
            sublayers=[SublayerRouting(**row) for row in values["sublayers"]],
        )

    def deep_summary(self, fraction: float = 0.25) -> dict[str, float] | None:
        """Mean max weight, 1/n and normalised entropy over the deepest `fraction` of routed sublayers.

        The final routing is excluded. Returns None when the model has no routed sublayer.
        """
        rows = [row for row in self.sublayers if row.label != "final"]
        if not rows:
            return None
        deep = rows[-max(1, round(len(rows) * fraction)) :]
        return {
            "max_weight": sum(r.max_weight for r in deep) / len(deep),
            "uniform_weight": sum(r.uniform_weight for r in deep) / len(deep),
            "normalized_entropy": sum(r.normalized_entropy for r in deep) / len(deep),
            "num_sublayers": float(len(deep)),
            "first_sublayer": float(deep[0].sublayer),
        }


class RoutingAccumulator:
    """A recorder for `DecoderLM.forward(recorder=...)` that accumulates statistics per sublayer."""

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, Any]] = {}

    @torch.no_grad()
    def record(self, sublayer: int, weights: Tensor, sources: tuple[Tensor, ...]) -> None:
        weights = weights.detach().float().flatten(1)  # (S, N)
        count = weights.shape[1]
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(0)  # (N,)
        entry = self.sums.setdefault(
            sublayer,
            {
                "count": 0,
                "max": 0.0,
                "entropy": 0.0,
                "exp_entropy": 0.0,
                "weights": torch.zeros(weights.shape[0]),
                "cosine": 0.0,
                "cosine_count": 0,
                "rank": 0.0,
                "rank_count": 0,
            },
        )
        entry["count"] += count
        entry["max"] += weights.max(0).values.sum().item()
        entry["entropy"] += entropy.sum().item()
        entry["exp_entropy"] += entropy.exp().sum().item()
        entry["weights"] += weights.sum(1).cpu()

        stacked = torch.stack([s.detach().float().flatten(0, -2) for s in sources])  # (S, N, D)
        if stacked.shape[0] > 1:
            cosine = torch.nn.functional.cosine_similarity(stacked[:-1], stacked[1:], dim=-1)  # (S-1, N)
            entry["cosine"] += cosine.mean(0).sum().item()
            entry["cosine_count"] += count
        sample = stacked[:, : min(RANK_SAMPLE_TOKENS, count)].transpose(0, 1)  # (n, S, D)
        singular = torch.linalg.svdvals(sample)  # (n, min(S, D))
        p = singular / singular.sum(-1, keepdim=True).clamp_min(1e-30)
        rank = torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1))
        entry["rank"] += rank.sum().item()
        entry["rank_count"] += sample.shape[0]

    def result(self, scheme: str, num_sublayers: int, num_tokens: int) -> RoutingTrace:
        rows = []
        for sublayer in sorted(self.sums):
            entry = self.sums[sublayer]
            count = entry["count"]
            n = entry["weights"].shape[0]
            entropy = entry["entropy"] / count
            rows.append(
                SublayerRouting(
                    sublayer=sublayer,
                    label=sublayer_label(sublayer, num_sublayers),
                    num_sources=n,
                    max_weight=entry["max"] / count,
                    entropy=entropy,
                    normalized_entropy=entropy / math.log(n),
                    effective_sources=entry["exp_entropy"] / count,
                    mean_weights=(entry["weights"] / count).tolist(),
                    adjacent_cosine=entry["cosine"] / max(entry["cosine_count"], 1),
                    effective_rank=entry["rank"] / max(entry["rank_count"], 1),
                )
            )
        return RoutingTrace(scheme=scheme, num_tokens=num_tokens, sublayers=rows)


@torch.no_grad()
def trace_routing(
    model: DecoderLM, batches: Iterable[Tensor], device: torch.device | str = "cpu"
) -> RoutingTrace:
    """Run `model` on token batches (each (B, T)) and return its routing statistics."""
    was_training = model.training
    model.eval()
    accumulator = RoutingAccumulator()
    num_tokens = 0
    for batch in batches:
        model(batch.to(device), recorder=accumulator)
        num_tokens += batch.numel()
    model.train(was_training)
    return accumulator.result(model.config.residual.scheme, model.config.num_sublayers, num_tokens)
