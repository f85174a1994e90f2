"""Time the candidate PyTorch ops for the routing kernel's per-token dot products and sums.

Each op runs on one (4, 256, 512) float32 tensor at a time, cycling through 40 of them (80 MiB in all),
so the data comes from main memory as in a training step rather than from cache. Prints microseconds
per call. Usage: python scripts/bench_routing_ops.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

COUNT = 40
SHAPE = (4, 256, 512)


def time_per_call(op: Callable[[int], object], repeats: int = 3) -> float:
    """Return the mean time of op(i) in microseconds, over `repeats` passes through all tensors."""
    op(0)
    start = time.perf_counter()
    for _ in range(repeats):
        for index in range(COUNT):
            op(index)
    return (time.perf_counter() - start) / (repeats * COUNT) * 1e6


def main() -> None:
    torch.manual_seed(0)
    sources = [torch.randn(SHAPE) for _ in range(COUNT)]
    grads = [torch.randn(SHAPE) for _ in range(COUNT)]
    width = SHAPE[-1]
    query = torch.randn(width)
    scratch = torch.empty(SHAPE)
    logits = torch.empty(SHAPE[:-1])
    coef = torch.randn(SHAPE[:-1])

    cases: dict[str, Callable[[int], object]] = {
        "q . s per token: mul + sum into buffers": lambda i: torch.sum(
            torch.mul(sources[i], query, out=scratch), dim=-1, out=logits
        ),
        "q . s per token: matmul": lambda i: torch.matmul(sources[i], query),
        "g . s per token: mul + sum into buffers": lambda i: torch.sum(
            torch.mul(sources[i], grads[i], out=scratch), dim=-1, out=logits
        ),
        "g . s per token: linalg.vecdot": lambda i: torch.linalg.vecdot(sources[i], grads[i]),
        "g . s per token: bmm": lambda i: torch.bmm(
            sources[i].view(-1, 1, width), grads[i].view(-1, width, 1)
        ),
        "g . s per token: einsum": lambda i: torch.einsum("btd,btd->bt", sources[i], grads[i]),
        "sum_t c_t s_t: addcmul_ into a buffer": lambda i: scratch.addcmul_(sources[i], coef.unsqueeze(-1)),
        "sum_t c_t s_t: mv": lambda i: torch.mv(sources[i].view(-1, width).t(), coef.view(-1)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tensors {SHAPE} float32")
    for name, op in cases.items():
        print(f"{time_per_call(op):8.1f} us  {name}")


if __name__ == "__main__":
    main()
