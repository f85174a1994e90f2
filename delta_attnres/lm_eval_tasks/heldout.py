"""Documents and metrics of the lm-evaluation-harness task `delta_attnres_heldout`."""

from __future__ import annotations

import re
from typing import Any


def load_heldout(val_fraction: float = 0.1, split_seed: int = 0, **metadata: Any) -> Any:
    """Return a DatasetDict whose "validation" split contains the held-out documents of the default corpus.

    The split is the one `delta-attnres train` uses with the same `val_fraction` and `split_seed`. Other
    task metadata (such as `version`) is ignored.
    """
    import datasets

    from delta_attnres.data import load_documents, split_documents

    heldout = split_documents(load_documents(None), val_fraction, split_seed)[1]
    rows = {"name": [document.name for document in heldout], "text": [document.text for document in heldout]}
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)})


def process_results(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    """Pair the document's log-likelihood with its word and UTF-8 byte counts for the perplexity metrics."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    num_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, num_bytes),
        "bits_per_byte": (loglikelihood, num_bytes),
    }
