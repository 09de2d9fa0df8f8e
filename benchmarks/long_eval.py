"""Greedy eval of a finished run's weights on episodes of other lengths: does a policy trained
on `long_addition` (configs/long_terminal.yaml: eval at 256 calls) hold at 1,000 calls?

    python benchmarks/long_eval.py RUN_DIR [RUN_DIR ...] --calls 256 1000 [--size 32]

Reads: each RUN_DIR's `config.yaml` and `checkpoints/final` (the weights it ended with).
Writes: nothing; prints one line per run and length: greedy success on `--size` held-out
episodes (the run's eval split, the same tasks every time), the calls per second, the wall time
and the CPU. Runs in this process on the HF engine, as the run's own evals do (a rollout actor's
`evaluate`), with no buffer or learner behind it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offpolicy.actors.rollout import RolloutActor  # noqa: E402
from offpolicy.core.machine import cpu_model  # noqa: E402
from offpolicy.core.process import setup_process  # noqa: E402
from offpolicy.runtime.validate import load_config  # noqa: E402
from offpolicy.weights.sync import LocalSync  # noqa: E402


def evaluate(run_dir: Path, calls: int, size: int) -> dict:
    cfg = load_config(run_dir / "config.yaml", ["resources.serial=true"])
    env = replace(cfg.env, eval_size=size,
                  eval_kwargs={**cfg.env.eval_kwargs, "calls": calls})
    cfg = replace(cfg, env=env)
    model = run_dir / "checkpoints" / "final"
    if not model.is_dir():
        raise SystemExit(f"{run_dir}: no checkpoints/final (did the run finish?)")
    actor = RolloutActor(cfg, 0, str(model), buffer=None, weights=LocalSync())
    start = time.perf_counter()
    out = actor.evaluate()
    return {"reward": out["eval/reward"], "seconds": time.perf_counter() - start,
            "calls": size * calls}  # long_addition plays every call, right or wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--calls", nargs="+", type=int, default=[256, 1000])
    parser.add_argument("--size", type=int, default=32, help="held-out episodes per length")
    args = parser.parse_args()
    setup_process(threads=1)
    print(f"greedy success on {args.size} held-out long_addition episodes; {cpu_model()}")
    for run in args.runs:
        for calls in args.calls:
            r = evaluate(run, calls, args.size)
            print(f"{run}: {calls} calls: success {r['reward']:.3f} "
                  f"({r['calls'] / r['seconds']:,.0f} calls/s, {r['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
