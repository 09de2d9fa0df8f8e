"""Replay-buffer throughput as it grows: add + sample operations per second at 10k, 100k and 1M
stored trajectories, for each sampler, side by side in one run.

One operation = add one GRPO group (8 trajectories; the buffer is full, so the oldest group is
evicted) + sample one batch of 4 groups (`max_reuse` high, so sampling does not drain it).
This is the steady state of a long run with a large buffer. Trajectories are real `Trajectory`
objects from a pool of 2,000 distinct groups with random rewards (the pass-rate priority varies)
and completion lengths; each stored group is a reference into the pool, as in a run where the
buffer holds what the actors sent.

Prints ops/s per (sampler, size) and the ratio of 1M to 10k per sampler: the acceptance bar for
`prioritized` (sum tree, O(log n)) is a ratio of at least 0.5.

Run: python benchmarks/buffer_throughput.py [--sizes 10000 100000 1000000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.core.types import Trajectory

GROUP, BATCH_GROUPS = 8, 4


def make_pool(n_groups: int, seed: int = 0) -> list[list[Trajectory]]:
    rng = np.random.default_rng(seed)
    pool = []
    for g in range(n_groups):
        p = rng.random()
        group = []
        for k in range(GROUP):
            T = int(rng.integers(4, 64))
            group.append(Trajectory(
                id=f"{g}-{k}", group_id=str(g), prompt_ids=rng.integers(0, 100, 16, np.int32),
                completion_ids=rng.integers(0, 100, T, np.int32), loss_mask=np.ones(T, np.int8),
                behavior_logprobs=np.zeros(T, np.float32), versions=np.zeros(T, np.int32),
                reward=float(rng.random() < p), env="bench", finish_reason="stop"))
        pool.append(group)
    return pool


def measure(sampler: str, size: int, pool: list, seconds: float) -> tuple[float, float]:
    """(fill seconds, steady-state ops/s) for a buffer holding `size` trajectories."""
    buf = ReplayBuffer(BATCH_GROUPS, max_staleness=10**9, capacity=size, sampler=sampler,
                       max_reuse=10**9, seed=0)
    t0 = time.perf_counter()
    for i in range(size // GROUP):
        buf.add([pool[i % len(pool)]])
    fill = time.perf_counter() - t0
    assert buf.stats()["buffer/size"] == size
    ops, i = 0, 0
    t0 = time.perf_counter()
    while True:
        for _ in range(200):
            buf.add([pool[i % len(pool)]])
            batch = buf.sample(0, timeout=0)
            assert len(batch) == BATCH_GROUPS * GROUP
            i += 1
        ops += 200
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return fill, ops / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--samplers", nargs="+", default=["fifo", "uniform", "prioritized"])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    pool = make_pool(2000)
    print(f"{'sampler':12} {'stored':>9} {'fill s':>7} {'ops/s':>9}   (op = add 1 group of "
          f"{GROUP} + sample {BATCH_GROUPS} groups)", flush=True)
    results: dict[str, dict[int, float]] = {}
    for sampler in args.samplers:
        for size in args.sizes:
            fill, rate = measure(sampler, size, pool, args.seconds)
            results.setdefault(sampler, {})[size] = rate
            print(f"{sampler:12} {size:>9,} {fill:7.1f} {rate:9,.0f}", flush=True)
    lo, hi = min(args.sizes), max(args.sizes)
    print()
    for sampler, r in results.items():
        print(f"{sampler:12} ops/s at {hi:,} / at {lo:,} = {r[hi] / r[lo]:.2f}")


if __name__ == "__main__":
    main()
