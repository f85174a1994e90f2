"""Compare where two schemes spend a training step, op by op, at the benchmark's 12-layer shape.

Runs 2 warmup steps and 3 profiled steps (forward, backward, AdamW) per scheme with torch.profiler and
prints the ops whose self CPU time per step differs most. The shape is `delta-attnres bench`'s default.
Usage: python scripts/profile_step.py standard delta_block
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from delta_attnres.bench import bench_config, build_model, make_batch, train_step

WARMUP_STEPS = 2
PROFILED_STEPS = 3


def self_times_ms(scheme: str, num_layers: int) -> dict[str, float]:
    """Return the self CPU time per step in milliseconds of every op name, for one scheme."""
    config = bench_config()
    inputs, targets = make_batch(config, config.seed)
    model = build_model(config.model_config(scheme, num_layers), config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(WARMUP_STEPS):
        train_step(model, optimizer, inputs, targets)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(PROFILED_STEPS):
            train_step(model, optimizer, inputs, targets)
    return {event.key: event.self_cpu_time_total / PROFILED_STEPS / 1000 for event in profiler.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="scheme to compare against, for example standard")
    parser.add_argument("scheme", help="scheme to profile, for example delta_block")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
    parser.add_argument("--top", type=int, default=15, help="ops to print (default 15)")
    args = parser.parse_args()

    baseline = self_times_ms(args.baseline, args.layers)
    scheme = self_times_ms(args.scheme, args.layers)
    totals = f"{args.baseline} {sum(baseline.values()):.1f}, {args.scheme} {sum(scheme.values()):.1f}"
    print(f"self CPU ms per step: {totals}")
    names = set(baseline) | set(scheme)
    rows = sorted(names, key=lambda name: scheme.get(name, 0.0) - baseline.get(name, 0.0), reverse=True)
    print(f"{'difference':>10} {args.baseline:>12} {args.scheme:>12}  op")
    for name in rows[: args.top]:
        before, after = baseline.get(name, 0.0), scheme.get(name, 0.0)
        print(f"{after - before:10.1f} {before:12.1f} {after:12.1f}  {name}")


if __name__ == "__main__":
    main()
