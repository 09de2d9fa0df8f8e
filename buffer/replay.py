"""The replay buffer: whole GRPO groups in, whole groups out, staleness bounded two ways.

Reads: groups of Trajectories from rollout actors (`add`), sample requests from the learner.
Writes: Batches to the learner; counts of everything it drops.

Staleness (DESIGN.md): the staleness of a token is the learner version at the update that
consumes it minus the version that produced it. `max_staleness` is enforced
  1. by admission: before an actor starts a batch it asks `admit`, which predicts the version at
     which that batch will be consumed (queued and reserved groups go first, FIFO) and blocks
     while the prediction exceeds the bound, so actors do not generate work that would be
     thrown away (the prediction is for the batch's first group; see `_predicted_staleness`);
  2. by eviction: at `sample(version)`, groups whose oldest token is older than
     version - max_staleness are dropped and counted.

The class is plain Python and thread-safe; in a run it is a threaded Ray actor (several calls
block at once: actors in `admit`, the learner in `sample`), in tests it is used directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from offpolicy.types import Batch, Trajectory

Group = list[Trajectory]


class ReplayBuffer:
    def __init__(self, batch_groups: int, max_staleness: int, capacity: int,
                 drop_uniform_groups: bool = False):
        self.batch_groups = batch_groups
        self.drop_uniform_groups = drop_uniform_groups
        self.max_staleness = max_staleness
        self.capacity = capacity
        self._groups: deque[Group] = deque()
        self._size = 0                 # trajectories stored
        self._cond = threading.Condition()
        self.next_version = 0          # learner version of the next update to sample
        self.published = 0             # newest weights actors can load
        self.reserved = 0              # groups admitted but not yet added
        self.closed = False
        self.counts = {"added": 0, "filtered": 0, "sampled": 0, "evicted_staleness": 0,
                       "evicted_capacity": 0, "admission_waits": 0}

    # -- actors ---------------------------------------------------------------------------------

    def admit(self, version: int, n_groups: int, timeout: float = 1.0) -> dict:
        """Block until a batch of `n_groups` started now would be fresh enough when consumed.

        The actor will load the newest published weights first, so the prediction uses
        max(version, published). Returns {"admitted", "published", "stop"}; an admitted batch
        reserves its place in the queue until `add` (so two actors cannot both take the last
        fresh slot).
        """
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.closed or self._predicted_staleness(version) <= self.max_staleness,
                timeout=timeout)
            admitted = bool(ok) and not self.closed
            if admitted:
                self.reserved += n_groups
            elif not self.closed:
                self.counts["admission_waits"] += 1
            return {"admitted": admitted, "published": self.published, "stop": self.closed}

    def _predicted_staleness(self, version: int) -> int:
        """Staleness at which the first group of a new batch would be consumed.

        Predicting the first group (not the last) keeps the loop live: while the learner waits
        for data (fewer than batch_groups queued), a new batch is consumed at the version the
        learner waits at, so it is always admitted. Later groups of a large batch may end up
        older than the bound; eviction catches and counts them.
        """
        ahead = len(self._groups) + self.reserved
        consumed_at = self.next_version + ahead // self.batch_groups
        return consumed_at - max(version, self.published)

    def add(self, groups: list[Group], reserved: int = 0) -> int:
        """Store whole groups; returns the learner version (the next update's)."""
        with self._cond:
            self.reserved = max(0, self.reserved - reserved)
            for g in groups:
                self.counts["added"] += len(g)
                if self.drop_uniform_groups and len({t.reward for t in g}) == 1:
                    self.counts["filtered"] += len(g)  # every advantage would be zero
                    continue
                self._groups.append(g)
                self._size += len(g)
            while self._size > self.capacity:  # oldest first
                old = self._groups.popleft()
                self._size -= len(old)
                self.counts["evicted_capacity"] += len(old)
            self._cond.notify_all()
            return self.next_version

    # -- learner --------------------------------------------------------------------------------

    def sample(self, version: int, timeout: float = 1.0) -> Batch | None:
        """The oldest `batch_groups` fresh groups for update `version`, or None on timeout/close."""
        start = time.perf_counter()
        with self._cond:
            if version != self.next_version:
                self.next_version = version
                self._cond.notify_all()  # admission predictions changed
            self._evict_stale(version)
            ok = self._cond.wait_for(
                lambda: self.closed or len(self._evict_stale(version)) >= self.batch_groups,
                timeout=timeout)
            if not ok or len(self._groups) < self.batch_groups:
                return None
            groups = [self._groups.popleft() for _ in range(self.batch_groups)]
            trajs = [t for g in groups for t in g]
            self._size -= len(trajs)
            self.counts["sampled"] += len(trajs)
            self.next_version = version + 1
            self._cond.notify_all()
            stats = self._stats()
            stats["buffer/wait_s"] = time.perf_counter() - start
            return Batch(trajs, version, stats)

    def _evict_stale(self, version: int) -> deque[Group]:
        oldest_ok = version - self.max_staleness
        kept: deque[Group] = deque()
        for g in self._groups:
            if min(t.min_version() for t in g) >= oldest_ok:
                kept.append(g)
            else:
                self._size -= len(g)
                self.counts["evicted_staleness"] += len(g)
        self._groups = kept
        return kept

    def publish(self, version: int) -> None:
        """The learner published weights `version`: waiting actors may now be admitted."""
        with self._cond:
            self.published = max(self.published, version)
            self._cond.notify_all()

    def close(self) -> None:
        """End of run: every blocked and future call returns at once with stop."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def is_closed(self) -> bool:
        return self.closed

    # -- metrics --------------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._cond:
            return self._stats()

    def _stats(self) -> dict:
        c = self.counts
        return {"buffer/size": self._size, "buffer/groups": len(self._groups),
                "buffer/reserved_groups": self.reserved, "buffer/added": c["added"],
                "buffer/filtered": c["filtered"], "buffer/sampled": c["sampled"],
                "buffer/evicted_staleness": c["evicted_staleness"],
                "buffer/evicted_capacity": c["evicted_capacity"],
                "buffer/admission_waits": c["admission_waits"]}
