"""Long episodes on the tiny model: how generation, training and memory scale with episode length,
and what the continuous actor buys over the batch loop when lengths are heavy-tailed.

Part 1, episode sizes. For each size (about 10^3, 10^4, 10^5, 10^6 tokens per episode, contexts
included), one group of 2 `long_addition` episodes of that many calls runs through the Ray
layout (an actor, the buffer and the learner, each its own process), and the learner trains
every row of the group, `--batch-rows` rows a step (the episode's calls rounded to fit whole
batches; a group smaller than one batch is one step). The bound paces
admission, so the actor rests while the learner trains. No eval runs (the layout is driven
directly). Printed per size: the calls and tokens per episode, the actor's tokens/s (an
episode's tokens over its wall time, the group's two episodes generated side by side), the
learner's tokens/s (the rows' tokens over the learner's update time), the peak RSS of
the actor, the buffer and the learner, the weight versions an episode spanned, and the time per
episode; then each role's peak RSS at the largest size over the one at 10^4, and the actor's
tokens/s at the largest over the smallest.

Part 2, heavy-tailed lengths. `long_addition` with lengths drawn log-uniformly from 1 to
`--max-calls` calls; one actor in this process, no learner, for `--seconds` each, the two loops
alternating (continuous, batch, continuous, batch: a drift in the machine's speed hits both
alike): the continuous actor (`rollout.mode: continuous`, `--slots` episodes in flight) and
the batch loop (`rollout.mode: batch`, the same number of episodes per batch, each batch played
to its slowest). Printed: occupancy (episodes per engine call over the slots), policy tokens/s,
and the continuous/batch ratio of each, medians over the rounds.

Run: python benchmarks/long_episodes.py [--sizes 1e3 1e4 1e5 1e6] [--batch-rows 512]
         [--seconds 60] [--rounds 2] [--slots 64] [--max-calls 1000] [--skip-sizes]
     (about 25 minutes on 2 cores with the defaults, most of it the 10^6-token episode; the
     long_addition base model is built once and cached if the cache lacks it)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from offpolicy.core.process import setup_process

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "long_addition.yaml"
TOKENS_PER_CALL = 13  # "47+85+1=" with <bos>, then 3 digits and end-of-sequence


def _config(overrides: list[str]):
    from offpolicy.runtime.validate import load_config

    return load_config(CONFIG, ["engine.logprob_check_every=0", *overrides])


def size_run(tokens: int, batch_rows: int, root: Path) -> dict:
    """One group of 2 episodes of `tokens` tokens each, generated and trained end to end."""
    from offpolicy.config.plan import RunPlan
    from offpolicy.models.sources import ensure_base_model
    from offpolicy.runtime.ray_roles import RayRoles

    # whole batches take every row, so no remainder waits for a later group: the calls are
    # rounded to a multiple of batch_rows / 2 (0.2% off at 10^6), or one batch takes them all
    calls = max(1, round(tokens / TOKENS_PER_CALL))
    if 2 * calls >= batch_rows:
        calls = round(2 * calls / batch_rows) * batch_rows // 2
    else:
        batch_rows = 2 * calls
    cfg = _config([f"env.kwargs.calls={calls}", "env.kwargs.calls_max=0",
                   f"env.max_turns={calls + 1}", "rollout.group_size=2",
                   # the bound paces admission: once the group is in, the actor rests while
                   # the learner trains its rows (more than 4 steps' worth)
                   "buffer.max_staleness=4",
                   "rollout.concurrent_episodes=2", f"learner.batch_rows={batch_rows}",
                   f"learner.steps={10 ** 9}", f"run.dir={root / f'size{tokens}'}"])
    model = str(ensure_base_model(cfg))
    session = RayRoles(cfg, RunPlan.of(cfg), model, log=lambda *a: None)
    rows_total, metrics = 2 * calls, []
    try:
        session.start()
        while sum(m["learner/batch_size"] for m in metrics) < rows_total:
            metrics.append(session.step())
        buffer, actors, _ = session.finish(root / f"size{tokens}" / "final")
    finally:
        session.close()
    first = next(m for m in metrics if "episode/count" in m)
    row_tokens = first["episode/tokens_mean"] / calls  # a row: one call's context and answer
    learner_s = sum(m["time/update_s"] for m in metrics)
    return {"tokens": tokens, "calls": calls, "episode_tokens": first["episode/tokens_mean"],
            "wall_s": first["episode/wall_s_mean"],
            "actor_tokens_per_s": 2 * first["episode/tokens_mean"] / first["episode/wall_s_mean"],
            "learner_tokens_per_s": rows_total * row_tokens / learner_s,
            "versions_spanned": first["episode/versions_spanned_max"],
            "rss_actor": actors[0]["peak_rss_mb"],
            "rss_buffer": max(m["buffer/peak_rss_mb"] for m in metrics),
            "rss_learner": max(m["memory/learner_peak_rss_mb"] for m in metrics),
            "steps": len(metrics)}


def heavy_tail(mode: str, seconds: float, slots: int, max_calls: int) -> dict:
    """One actor in this process generating heavy-tailed episodes for `seconds`."""
    from offpolicy.actors.rollout import RolloutActor
    from offpolicy.buffer.replay import ReplayBuffer
    from offpolicy.config.plan import RunPlan
    from offpolicy.models.sources import ensure_base_model
    from offpolicy.runtime.layout import buffer_arguments
    from offpolicy.weights.sync import LocalSync

    group = 4
    cfg = _config(["buffer.max_staleness=1000000",  # no learner here: admission never waits
                   "env.kwargs.calls=1", f"env.kwargs.calls_max={max_calls}",
                   f"env.max_turns={max_calls + 1}", f"rollout.group_size={group}",
                   f"rollout.mode={mode}", f"rollout.concurrent_episodes={slots}",
                   f"rollout.prompts_per_batch={slots // group}", "learner.batch_rows=256",
                   "buffer.capacity=20000"])
    model = str(ensure_base_model(cfg))
    actor = RolloutActor(cfg, 0, model, ReplayBuffer(**buffer_arguments(cfg, RunPlan.of(cfg))),
                         LocalSync())
    actor.turn(timeout=0)  # warm-up: the first engine call
    start, calls0, occ0, n0 = time.perf_counter(), actor.counts["calls"], \
        actor.counts["occupancy"], actor.counts["engine_calls"]
    while time.perf_counter() - start < seconds:
        actor.turn(timeout=0)
    elapsed = time.perf_counter() - start
    n = actor.counts["engine_calls"] - n0
    policy_tokens = (actor.counts["calls"] - calls0) * 4  # 3 digits + end-of-sequence a call
    return {"occupancy": (actor.counts["occupancy"] - occ0) / max(n, 1),
            "policy_tokens_per_s": policy_tokens / elapsed, "engine_calls": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    p.add_argument("--batch-rows", type=int, default=512)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max-calls", type=int, default=1000)
    p.add_argument("--skip-sizes", action="store_true")
    args = p.parse_args()
    setup_process(1)
    from offpolicy.core.machine import cpu_model

    print(f"CPU: {cpu_model()}; tiny model; configs/long_addition.yaml")
    if not args.skip_sizes:
        import tempfile

        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for t in args.sizes:
                start = time.perf_counter()
                rows.append(size_run(int(t), args.batch_rows, Path(tmp)))
                print(f"  {int(t):,} tokens per episode: {time.perf_counter() - start:.0f} s",
                      flush=True)
        _print_sizes(rows)
    runs: dict[str, list[dict]] = {"continuous": [], "batch": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(heavy_tail(mode, args.seconds, args.slots, args.max_calls))
    _print_heavy_tail(runs, args)


def _print_sizes(rows: list[dict]) -> None:
    print("\n| tokens per episode | calls | actor tokens/s | learner tokens/s | versions spanned "
          "| time per episode (s) | peak RSS MB: actor / buffer / learner |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['episode_tokens']:,.0f} | {r['calls']:,} | {r['actor_tokens_per_s']:,.0f} "
              f"| {r['learner_tokens_per_s']:,.0f} | {r['versions_spanned']:.0f} "
              f"| {r['wall_s']:.1f} | {r['rss_actor']:.0f} / {r['rss_buffer']:.0f} / "
              f"{r['rss_learner']:.0f} |")
    ref = next((r for r in rows if r["tokens"] == 10_000), rows[0])
    big, small = rows[-1], rows[0]
    print(f"\npeak RSS at {big['tokens']:,.0f} over {ref['tokens']:,.0f} tokens: actor "
          f"{big['rss_actor'] / ref['rss_actor']:.2f}x, buffer "
          f"{big['rss_buffer'] / ref['rss_buffer']:.2f}x, learner "
          f"{big['rss_learner'] / ref['rss_learner']:.2f}x")
    print(f"actor tokens/s at {big['tokens']:,.0f} over {small['tokens']:,.0f}: "
          f"{big['actor_tokens_per_s'] / small['actor_tokens_per_s']:.2f}x")


def _print_heavy_tail(runs: dict, args) -> None:
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for mode, rs in runs.items()}
    print(f"\nheavy-tailed lengths (1 to {args.max_calls} calls, log-uniform), {args.slots} "
          f"episodes in flight or per batch, {args.seconds:.0f} s x {args.rounds} rounds each, "
          "medians:")
    print("| loop | occupancy | policy tokens/s | engine calls |")
    print("|---|---|---|---|")
    for mode, m in med.items():
        print(f"| {mode} | {m['occupancy']:.2f} | {m['policy_tokens_per_s']:,.0f} | "
              f"{m['engine_calls']:,.0f} |")
    print(f"continuous / batch: occupancy {med['continuous']['occupancy'] / med['batch']['occupancy']:.2f}x, "
          f"policy tokens/s {med['continuous']['policy_tokens_per_s'] / med['batch']['policy_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
