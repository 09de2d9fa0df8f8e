"""The rollout actor's batch-synchronous side: `rollout.mode: batch` (a batch of groups played to
its slowest episode, kept for comparisons), whole batches for tests and benchmarks
(`rollout_batch`), and evals (greedy, on the fixed held-out set).

Reads: admission from the buffer, the engine through the actor's `_call`. Writes: groups to the
buffer; eval results. A mixin of `RolloutActor` (rollout.py), which holds the state it uses.
"""

from __future__ import annotations

import enum
import time
import uuid

import numpy as np

from offpolicy.actors.engine import SamplingParams
from offpolicy.actors.episodes import EpisodeGroup
from offpolicy.core.types import Trajectory


class BatchResult(enum.Enum):
    """What one `RolloutActor.advance` (or `one_batch`) did."""

    ADDED = "added"
    """Groups finished and went to the buffer."""
    ADVANCED = "advanced"
    """An engine call advanced the episodes in flight; no group finished."""
    REFUSED = "refused"
    """Nothing in flight, and the buffer did not admit a group in time (the staleness bound
    held the actor off)."""
    STOP = "stop"
    """The run is over."""


class BatchLoop:
    """`RolloutActor`'s methods that play whole batches (see the module doc)."""

    def one_batch(self, timeout: float = 1.0) -> BatchResult:
        """`rollout.mode: batch`: ask for admission (waiting up to `timeout`), serve the desk,
        load weights, play one batch of groups to its slowest episode and add it."""
        n = self.cfg.rollout.prompts_per_batch
        admission = self.buffer.admit(self.engine.version, n, timeout, actor=self.incarnation)
        if admission.stop:
            return BatchResult.STOP
        self._serve_desk(force=True)
        self._load(admission.version, admission.published)
        if not admission.admitted:
            return BatchResult.REFUSED
        seeds = self.rng.integers(0, 2**31, size=admission.n_groups)
        groups = self._play(self.make_env, seeds, self.cfg.rollout.group_size, self.sampling,
                            self._inflight_sync if self.cfg.engine.inflight_updates else None)
        rows = [self._group_rows(g)[0] for g in groups]
        self._send([r for r in rows if r], admission.n_groups, admission.version, [])
        return BatchResult.ADDED

    def rollout_batch(self, n_prompts: int | None = None) -> list[list[Trajectory]]:
        """n_prompts (default prompts_per_batch) x group_size episodes played to the end;
        returns whole groups (a group with a failed episode is dropped)."""
        seeds = self.rng.integers(0, 2**31, size=n_prompts or self.cfg.rollout.prompts_per_batch)
        groups = self._play(self.make_env, seeds, self.cfg.rollout.group_size, self.sampling,
                            self._inflight_sync if self.cfg.engine.inflight_updates else None)
        return [rows for rows, _ in map(self._group_rows, groups) if rows]

    def evaluate(self) -> dict:
        """Greedy reward on the fixed held-out eval set with the weights loaded now, played as
        training episodes are (multi-turn and many-call included), on this actor's engine."""
        t0 = time.perf_counter()
        greedy = SamplingParams(max_new_tokens=self.cfg.engine.max_new_tokens, greedy=True,
                                stop=tuple(self.cfg.engine.stop))
        groups = self._play(self.make_eval_env, range(self.cfg.env.eval_size), 1, greedy, None,
                            count=False)
        rewards = [ep.reward for g in groups for ep in g.episodes]
        return {"eval/reward": float(np.mean(rewards)), "eval/version": self.engine.version,
                "eval/seconds": time.perf_counter() - t0}

    def _play(self, make, seeds, n: int, sampling: SamplingParams, between_steps,
              count: bool = True) -> list[EpisodeGroup]:
        """n episodes per seed played to the end, every call one engine call over the episodes
        still running."""
        groups = []
        for seed in seeds:
            group = EpisodeGroup(f"{self.actor_id}-{uuid.uuid4().hex[:12]}", int(seed))
            try:
                group.episodes = self._episodes(make, group.id, int(seed), n)
            except Exception as e:
                group.failed = True
                self.failures.record(group.id, 0, e, self.counts)
            groups.append(group)
        saved = self.counts
        if not count:  # evals are not training work
            self.counts = dict(saved)
        while live := [ep for g in groups for ep in g.episodes if ep.finish is None]:
            self._call(live, sampling, between_steps)
        self.counts = saved
        return groups


