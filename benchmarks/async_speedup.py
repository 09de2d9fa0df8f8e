"""What asynchrony buys when the environment is slow: synchronous vs asynchronous training.

Both modes train `configs/multiturn.yaml`'s `guess` task (a number in 0-7, 1 to 3 turns per
episode: variable lengths; its tiny model is built and cached on the first run) with
simulated, heavy-tailed environment latency on every step, the same actors, batch and model, in
one run of this script. The modes take turns in ABBA order (sync, async, async, sync with the
default `--rounds 2`) and each mode's runs are pooled, so a drift in the machine's speed during
the run (this is a shared VM: the same update took 0.25 to 0.35 s at different times) falls on
both modes alike:

- sync:  buffer.max_staleness 0. The learner waits while one batch is generated with its
  current weights, then trains on it; the actors wait while it trains.
- async: buffer.max_staleness K (default 16). Actors keep generating with the weights they
  hold while the learner trains. A batch takes about 5 learner steps to generate and 8 are in
  flight, so a bound of 12 or less holds actors off (measured: 12 left the learner idle 10-14%).

Both modes use learning rate 1e-5, so the policy and its episode lengths stay the same in both
(with the task's 3e-4 the async run's episodes got shorter than the sync run's within 60
steps, which made its updates cheaper): this measures throughput, not learning.

From the sync run it measures `gen`, the learner's wait for a batch, and `train`, the rest of a
learner step (update, weight publish, bookkeeping). With A actors generating concurrently,
perfect overlap gives a step time of max(train, gen / A), so

    ideal speedup = (gen + train) / max(train, gen / A)

and the script prints the measured speedup (async learner samples/s over sync), its share of
the ideal, and the learner's idle fraction (time waiting for data / wall time) in each mode.
Steps before `--warmup` (start-up, first weight loads) and the last step (final eval) are left
out of every figure.

Both runs pin the learner (with the buffer and the driver, which it waits on) to one core
(`resources.pin_cpus`) and run the actors at the lowest CPU priority (`resources.actor_nice:
19`; the run starts Ray's workers at niceness 0, not Ray's default 15, so 19 is really below the
learner), so they use any CPU the learner leaves but never take it from the learner: on 2 cores
the counterpart of a learner with its own GPU. Measured without them, generation slowed the
update (0.35 s -> 0.49 s); with the actors pinned to the second core they could not keep up.

Run: python benchmarks/async_speedup.py [--steps 60] [--rounds 2] [--actors 8]
     [--latency lognormal:0.1,0.5] [--set KEY=VALUE ...]   (about 8 min on 2 cores, CPU model unrecorded)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CONFIG = Path(__file__).parents[1] / "configs" / "multiturn.yaml"


def run(mode: str, args, root: Path) -> dict:
    """One training run in `mode`; returns its sums over the measured steps."""
    from offpolicy.runtime.validate import load_config
    from offpolicy.runtime.launch import train

    overrides = [
        f"run.dir={root}", f"learner.lr={args.lr}", f"learner.steps={args.steps}",
        f"eval.every={args.steps}",
        f"rollout.num_actors={args.actors}", f"rollout.prompts_per_batch={args.groups}",
        f"learner.batch_groups={args.groups}", f"env.latency={args.latency}",
        "env.timeout_s=30", f"resources.actor_cpus={1 / (args.actors + 1):.3f}",
        "resources.learner_cpus=0.5", "resources.pin_cpus=true",
        "resources.actor_nice=19",
        "buffer.drop_uniform_groups=false",
        f"buffer.max_staleness={0 if mode == 'sync' else args.staleness}",
        "log.progress_every_s=10", *args.set]
    cfg = load_config(CONFIG, overrides)
    print(f"--- {mode}: {args.actors} actors, max_staleness {cfg.buffer.max_staleness}, "
          f"{args.steps} steps of {args.groups} groups x {cfg.rollout.group_size}", flush=True)
    train(cfg, log=lambda s: None)
    rows = [json.loads(line) for line in (root / "metrics.jsonl").open()]
    window = rows[args.warmup:-1]  # the last step also ran the final eval
    return {"staleness": cfg.buffer.max_staleness, "steps": len(window),
            "wall": window[-1]["time/elapsed_s"] - rows[args.warmup - 1]["time/elapsed_s"],
            **{k: sum(r[m] for r in window) for k, m in (
                ("wait", "time/wait_s"), ("samples", "learner/batch_size"),
                ("update", "time/update_s"), ("backward", "time/backward_s"),
                ("publish", "time/publish_s"), ("turns", "rollout/turns"),
                ("staleness_mean", "staleness/mean"))}}


def pooled(mode: str, runs: list[dict]) -> dict:
    """Per-step figures of a mode over all its runs (sums pooled, then divided)."""
    tot = {k: sum(r[k] for r in runs) for k in runs[0] if k != "staleness"}
    n, wall = tot["steps"], tot["wall"]
    return {"mode": mode, "staleness": runs[0]["staleness"], "runs": len(runs),
            "samples_per_s": tot["samples"] / wall, "step_s": wall / n,
            "gen_s": tot["wait"] / n, "train_s": (wall - tot["wait"]) / n,
            "idle": tot["wait"] / wall,
            **{k: tot[k] / n for k in ("update", "backward", "publish", "turns",
                                       "staleness_mean")},
            "each": [r["samples"] / r["wall"] for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2,
                   help="sync/async pairs, run in ABBA order so drift in the machine's speed "
                        "(a shared VM) cancels")
    p.add_argument("--actors", type=int, default=8)
    p.add_argument("--groups", type=int, default=16, help="groups per batch (8 episodes each)")
    p.add_argument("--staleness", type=int, default=16, help="async max_staleness")
    p.add_argument("--lr", type=float, default=1e-5,
                   help="small, so the policy (and its episode lengths) stays the same in both "
                        "modes: this measures throughput, not learning")
    p.add_argument("--latency", default="lognormal:0.1,0.5",
                   help="env.latency per step (median 0.1 s, heavy right tail)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides for both modes, e.g. resources.actor_nice=0")
    args = p.parse_args()
    order = [m for i in range(args.rounds) for m in
             (("sync", "async") if i % 2 == 0 else ("async", "sync"))]
    runs = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory(prefix="async-speedup-") as tmp:
        for i, mode in enumerate(order):
            runs[mode].append(run(mode, args, Path(tmp) / f"{i}-{mode}"))
    sync, async_ = pooled("sync", runs["sync"]), pooled("async", runs["async"])

    print(f"\nguess task, env.latency {args.latency}, {args.actors} actors, batch {args.groups} "
          f"groups x 8; steps {args.warmup + 1}-{args.steps - 1} of {args.steps}; "
          f"order {' '.join(order)}, pooled per mode")
    print("| mode | max_staleness | learner samples/s | step s | waiting for data s | "
          "training s | of which update s | idle fraction | turns/episode | mean staleness |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in (sync, async_):
        print(f"| {r['mode']} | {r['staleness']} | {r['samples_per_s']:.1f} | {r['step_s']:.3f} | "
              f"{r['gen_s']:.3f} | {r['train_s']:.3f} | {r['update']:.3f} | {r['idle']:.1%} | "
              f"{r['turns']:.2f} | {r['staleness_mean']:.2f} |")
    for r in (sync, async_):
        print(f"{r['mode']}: samples/s per run {', '.join(f'{x:.1f}' for x in r['each'])}; "
              f"update {r['update']:.3f} s = forward/backward/optimizer {r['backward']:.3f} s "
              f"+ weight publish {r['publish']:.3f} s + rest")
    gen, trn = sync["gen_s"], sync["train_s"]
    ideal = (gen + trn) / max(trn, gen / args.actors)
    speedup = async_["samples_per_s"] / sync["samples_per_s"]
    capacity = args.actors / gen
    print(f"\nsync: generation {gen:.3f} s + training {trn:.3f} s per step; "
          f"{args.actors} actors can generate {capacity:.2f} batches/s, "
          f"the learner consumes {1 / trn:.2f}")
    print(f"ideal speedup (gen + train) / max(train, gen / {args.actors}) = {ideal:.2f}x")
    print(f"measured speedup {speedup:.2f}x = {speedup / ideal:.0%} of ideal; "
          f"async learner idle {async_['idle']:.1%}")


if __name__ == "__main__":
    main()
