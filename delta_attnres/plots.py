"""PNG figures drawn from computed results (metrics and routing traces); nothing here runs a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .analysis import RoutingTrace
from .storage import atomic_path

DPI = 120


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str) -> None:
    """Validation loss against tokens seen, one line per label; `curves[label]` is [(tokens, loss), ...]."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        if points:
            tokens, losses = zip(*points, strict=True)
            ax.plot(tokens, losses, marker="o", markersize=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_max_weight_by_depth(traces: Mapping[str, RoutingTrace], path: Path, title: str) -> None:
    """Mean max routing weight against sublayer depth, with 1/n (uniform routing) dashed per trace."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, trace in traces.items():
        rows = [row for row in trace.sublayers if row.label != "final"]
        if not rows:
            continue
        depth = [row.sublayer for row in rows]
        (line,) = ax.plot(depth, [row.max_weight for row in rows], marker="o", markersize=3, label=label)
        ax.plot(
            depth,
            [row.uniform_weight for row in rows],
            linestyle="--",
            color=line.get_color(),
            alpha=0.6,
            label=f"{label}: 1/n",
        )
    ax.set_xlabel("sublayer (0 = first attention; even = attention, odd = MLP)")
    ax.set_ylabel("mean max routing weight")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)
