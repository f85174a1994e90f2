"""PNG figures drawn from computed results (metrics and routing traces). Nothing here runs a model.

Every figure is written atomically at DPI dots per inch, so its pixel size is its figure size in inches
times DPI, truncated to whole pixels (matplotlib 3.11).
"""

from __future__ import annotations

import itertools
import math
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from .analysis import RoutingTrace
from .storage import atomic_path

DPI = 120
DEPTH_FIGSIZE = (8.0, 7.5)  # inches; the stacked by-depth figures
MAX_DEPTH_TICKS = 40  # beyond this many sublayers, label every k-th tick
ANNOTATE_MAX_COLUMNS = 12  # heat maps with at most this many sources print each weight in its cell
BY_DEPTH_PLOT = "routing_max_weight.png"
SOURCES_PLOT = "routing_sources.png"


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str) -> None:
    """Validation loss against tokens seen, one line per label; `curves[label]` is [(tokens, loss), ...]."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
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


def heatmap_figsize(num_rows: int, num_columns: int) -> tuple[float, float]:
    """Return the figure size in inches of a routing heat map with these many sublayers and sources."""
    width = min(16.0, max(6.0, 2.5 + 0.45 * num_columns))
    height = min(14.0, max(4.0, 1.8 + 0.32 * num_rows))
    return width, height


def plot_routing_heatmap(trace: RoutingTrace, path: Path, title: str) -> None:
    """Plot the mean routing weight of every source (columns) at every routed sublayer (rows).

    Grey cells are sources that a sublayer does not route over. Raises ValueError for a trace without
    routed sublayers.
    """
    if not trace.sublayers:
        raise ValueError(f"scheme {trace.scheme!r} has no routed sublayers to plot")
    rows, columns, matrix = trace.weight_matrix()
    values = np.ma.masked_invalid(np.array(matrix, dtype=float))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")

    fig, ax = plt.subplots(figsize=heatmap_figsize(len(rows), len(columns)), layout="constrained")
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=max(float(values.max()), 1e-6), aspect="auto")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.9)
    colorbar.set_label("mean routing weight")
    ax.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 20 else 0)
    ax.set_yticks(range(len(rows)), rows)
    # Wrap the source legend to the figure width (about 9 characters per inch at this font size).
    ax.set_xlabel(textwrap.fill(_source_axis_label(trace), width=int(9 * fig.get_figwidth())))
    ax.set_ylabel("routed sublayer (layer.kind)")
    ax.set_title(title)

    if len(columns) <= ANNOTATE_MAX_COLUMNS:
        threshold = 0.6 * float(values.max())
        for i, row in enumerate(matrix):
            for j, weight in enumerate(row):
                if not math.isnan(weight):
                    color = "black" if weight > threshold else "white"
                    ax.text(j, i, f"{weight:.2f}", ha="center", va="center", fontsize=7, color=color)
    _save(fig, path)


def _source_axis_label(trace: RoutingTrace) -> str:
    if trace.sources == "sublayer":
        return "source (e: embedding, vk: output of the k-th sublayer, v1 = 0.attn; grey: not a source)"
    if trace.sources == "block":
        return "source (e: embedding, Bk: output sum of block k, partial: current block; grey: not a source)"
    return "source (hk: running state after k-1 sublayers, h1 = e; grey: not a source)"


def plot_routing_by_depth(traces: Mapping[str, RoutingTrace], path: Path, title: str) -> None:
    """Plot max weight (with 1/n dashed) and normalised entropy H / log n against depth, a colour per trace.

    The final routing, where a scheme has one, is an unconnected star at the right end.
    """
    fig, (top, bottom) = plt.subplots(2, 1, figsize=DEPTH_FIGSIZE, sharex=True, layout="constrained")
    final_x = _final_position(traces)
    handles = []
    for color, (label, trace) in zip(_colors(), traces.items(), strict=False):
        handles.append(Line2D([], [], color=color, marker="o", label=label))
        _plot_series(top, trace, lambda row: row.max_weight, color, "-", final_x)
        _plot_series(top, trace, lambda row: row.uniform_weight, color, "--", final_x)
        _plot_series(bottom, trace, lambda row: row.normalized_entropy, color, "-", final_x)
    handles.append(Line2D([], [], color="grey", linestyle="--", label="1/n (uniform routing)"))
    handles.append(
        Line2D([], [], color="grey", marker="*", linestyle="", markersize=9, label="final routing")
    )

    top.set_ylabel("mean max routing weight")
    top.set_ylim(0, 1.02)
    top.set_title(title)
    bottom.set_ylabel("normalised entropy H / log n")
    bottom.set_ylim(0, 1.05)
    bottom.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    _finish_depth_axes(fig, bottom, (top, bottom), traces, handles)
    _save(fig, path)


def plot_sources_by_depth(traces: Mapping[str, RoutingTrace], path: Path, title: str) -> None:
    """Plot the cosine of adjacent sources, and the effective rank of the source set beside n, against depth."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=DEPTH_FIGSIZE, sharex=True, layout="constrained")
    final_x = _final_position(traces)
    handles = []
    for color, (label, trace) in zip(_colors(), traces.items(), strict=False):
        handles.append(Line2D([], [], color=color, marker="o", label=label))
        _plot_series(top, trace, lambda row: row.adjacent_cosine, color, "-", final_x)
        _plot_series(bottom, trace, lambda row: row.effective_rank, color, "-", final_x)
        _plot_series(bottom, trace, lambda row: float(row.num_sources), color, "--", final_x)
    handles.append(Line2D([], [], color="grey", linestyle="--", label="n (number of sources)"))
    handles.append(
        Line2D([], [], color="grey", marker="*", linestyle="", markersize=9, label="final routing")
    )

    top.set_ylabel("mean cosine of adjacent sources")
    lowest = min((row.adjacent_cosine for trace in traces.values() for row in trace.sublayers), default=0.0)
    top.set_ylim(min(-0.05, lowest - 0.05), 1.02)
    top.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    top.set_title(title)
    bottom.set_ylabel("effective rank of the sources")
    bottom.set_ylim(bottom=0)
    _finish_depth_axes(fig, bottom, (top, bottom), traces, handles)
    _save(fig, path)


def _colors() -> Iterator[Any]:
    """Yield colours without end: tab10, then tab20's lighter shades, then the same again."""
    tab10 = list(plt.get_cmap("tab10").colors)  # type: ignore[attr-defined]
    tab20 = list(plt.get_cmap("tab20").colors)  # type: ignore[attr-defined]
    return itertools.cycle(tab10 + tab20[1::2])


def _final_position(traces: Mapping[str, RoutingTrace]) -> int:
    """Return the x position shared by the final routings: one past the deepest model's last sublayer."""
    return max(trace.num_sublayers for trace in traces.values())


def _plot_series(ax: Any, trace: RoutingTrace, value: Any, color: Any, linestyle: str, final_x: int) -> None:
    """Plot value(row) of the routed sublayers as a line and the final routing as a star at `final_x`."""
    rows = [row for row in trace.sublayers if row.label != "final"]
    final = [row for row in trace.sublayers if row.label == "final"]
    dashed = linestyle != "-"
    if rows:
        ax.plot(
            [row.sublayer for row in rows],
            [value(row) for row in rows],
            color=color,
            linestyle=linestyle,
            linewidth=1.0 if dashed else 1.6,
            alpha=0.7 if dashed else 1.0,
            marker=None if dashed else "o",
            markersize=3,
        )
    for row in final:
        ax.plot(
            [final_x],
            [value(row)],
            color=color,
            marker="_" if dashed else "*",
            markersize=12 if dashed else 10,
            linestyle="",
        )


def _finish_depth_axes(
    fig: Any, bottom: Any, axes: Sequence[Any], traces: Mapping[str, RoutingTrace], handles: list[Any]
) -> None:
    final_x = _final_position(traces)
    labels: dict[int, str] = {}
    for trace in traces.values():
        for row in trace.sublayers:
            labels[final_x if row.label == "final" else row.sublayer] = row.label
    positions = sorted(labels)
    step = max(1, math.ceil(len(positions) / MAX_DEPTH_TICKS))
    shown = positions[::step]
    bottom.set_xticks(shown, [labels[x] for x in shown], rotation=60, ha="right", fontsize=8)
    bottom.set_xlabel("routed sublayer (layer.kind; final = routing before the output norm)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8)


def heatmap_file_names(labels: Sequence[str]) -> dict[str, str]:
    """Map every label to a distinct file name "routing_heatmap_<label>.png" made of safe characters."""
    names: dict[str, str] = {}
    for label in labels:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.") or "model"
        name, counter = f"routing_heatmap_{stem}.png", 1
        while name in names.values():
            counter += 1
            name = f"routing_heatmap_{stem}_{counter}.png"
        names[label] = name
    return names


def plot_routing_figures(
    traces: Mapping[str, RoutingTrace], out_dir: Path, title_note: str = ""
) -> dict[str, Any]:
    """Write a heat map per routed trace and the two by-depth figures of all routed traces in `out_dir`.

    Returns the file names written: {"heatmaps": {label: name}, "by_depth": name, "sources": name}, with
    None for the by-depth figures when no trace has routed sublayers. `title_note` ends every title.
    """
    routed = {label: trace for label, trace in traces.items() if trace.sublayers}
    names = heatmap_file_names(list(routed))
    for label, trace in routed.items():
        plot_routing_heatmap(trace, out_dir / names[label], f"Mean routing weights: {label}{title_note}")
    if not routed:
        return {"heatmaps": {}, "by_depth": None, "sources": None}
    plot_routing_by_depth(routed, out_dir / BY_DEPTH_PLOT, f"Routing sharpness by depth{title_note}")
    plot_sources_by_depth(routed, out_dir / SOURCES_PLOT, f"Routing sources by depth{title_note}")
    return {"heatmaps": names, "by_depth": BY_DEPTH_PLOT, "sources": SOURCES_PLOT}
