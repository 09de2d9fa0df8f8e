"""Bound-mode storage: stored groups, picked by a sampler, staleness bounded by admission and
eviction (`staleness.mode: bound`, the default).

Reads: groups from `ReplayBuffer.add`. Writes: the groups of a batch (`take`); every drop is
counted in this store's `fates`: `evicted_staleness`, `evicted_capacity`, `retired` (used
`max_reuse` times). The members are the `Store` protocol's (store.py).

Each group gets a slot; a sampler (`samplers.py`: fifo, uniform, prioritized) picks the slots
of the next batch. Capacity is in trajectories and in bytes; beyond either the oldest groups
are evicted. A min-heap on each group's oldest token version finds stale groups in O(log n).

Admission (`admit`) predicts the version at which a batch started now would be consumed:
groups not sampled yet and groups on order go first (FIFO), so the first group of the new
batch is consumed at next_version + ahead // batch_groups. Predicting the first group (not the
last) keeps the loop live: while the learner waits for data, a new batch is consumed at the
version the learner waits at, so it is always admitted. Later groups of a large batch may end
up older than the bound; eviction at `available` catches and counts them.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import numpy as np

from offpolicy.buffer.ledger import STORE_FATES
from offpolicy.buffer.samplers import PRIORITIES, SAMPLERS, pass_rate
from offpolicy.buffer.store import Group, fresh_version


@dataclass
class Entry:
    """One stored group and what the buffer needs to know about it without touching it again."""

    group: Group
    seq: int           # arrival number: age order, and tells a live heap item from a dead one
    min_version: int   # what staleness bounds (`store.fresh_version`)
    nbytes: int
    pass_rate: float
    uses: int = 0

    @classmethod
    def of(cls, group: Group, seq: int, uses: int = 0) -> "Entry":
        return cls(group, seq, fresh_version(group),
                   sum(t.nbytes for t in group), pass_rate(group), uses)


class BoundStore:
    # constructor settings: a snapshot carries the state, a resumed run its own settings
    SETTINGS = ("batch_groups", "max_staleness", "capacity", "capacity_bytes", "max_reuse",
                "priority_fn", "sampler")

    def __init__(self, batch_groups: int, max_staleness: int, capacity: int,
                 capacity_bytes: int = 0, sampler: str = "fifo", priority: str = "pass_rate",
                 alpha: float = 0.6, beta: float = 0.4, max_reuse: int = 1, seed: int = 0):
        self.batch_groups, self.max_staleness = batch_groups, max_staleness
        self.capacity, self.capacity_bytes, self.max_reuse = capacity, capacity_bytes, max_reuse
        self.priority_fn = PRIORITIES.lookup(priority)
        self.sampler = SAMPLERS.lookup(sampler)(seed=seed, alpha=alpha, beta=beta)
        self.fates = dict.fromkeys(STORE_FATES, 0)
        self.entries: dict[int, Entry] = {}
        self.age: OrderedDict[int, None] = OrderedDict()  # slots, oldest first
        self.heap: list[tuple[int, int, int]] = []  # (min_version, seq, slot), lazily cleaned
        self.free: list[int] = []
        self.seq = 0
        self.unused = 0   # stored groups not sampled yet (what admission counts)
        self.size = 0     # trajectories stored
        self.nbytes = 0
        self.reuse_hist: dict[int, int] = defaultdict(int)  # groups sampled for the n-th time

    @property
    def groups(self) -> int:
        return len(self.entries)

    def sampler_state(self) -> dict:
        """The sampler's order and random state (a snapshot's; the sampler is a setting)."""
        rng = getattr(self.sampler, "rng", None)
        return {"slots": self.sampler.slots(), "rng": None if rng is None else rng.getstate()}

    def restore_sampler(self, state: dict) -> None:
        """This run's sampler takes over the snapshot's order, priorities recomputed."""
        for slot in state["slots"]:
            self.sampler.add(slot, self.priority_fn(self.entries[slot].group))
        if state["rng"] is not None and hasattr(self.sampler, "rng"):
            self.sampler.rng.setstate(state["rng"])

    # -- admission ------------------------------------------------------------------------------

    def admit(self, n_groups: int, version: int, next_version: int, published: int,
              reserved: int, survival: float,
              pending_rows: int = 0) -> tuple[int | None, int] | None:
        """(None, n_groups) when a batch started now by an actor at `version` (it loads
        `published` first) would be fresh enough when consumed, else None (wait)."""
        ahead = self.unused + reserved
        consumed_at = next_version + ahead // self.batch_groups
        if consumed_at - max(version, published) <= self.max_staleness:
            return None, n_groups
        return None

    def release(self, version: int | None, n_groups: int) -> None:
        """Reservations are the buffer's count alone in bound mode."""

    def release_all(self) -> None:
        """Nothing is on order per version in bound mode."""

    # -- storage --------------------------------------------------------------------------------

    def check_fit(self, groups: list[Group]) -> None:
        """A byte capacity below one learner batch would evict every batch before the
        learner could take it, and the run would stall: fail with the size it needs."""
        if not self.capacity_bytes or not groups:
            return
        per_group = sum(t.nbytes for g in groups for t in g) / len(groups)
        if per_group * self.batch_groups > self.capacity_bytes:
            raise ValueError(
                f"buffer.capacity_bytes: {self.capacity_bytes} bytes cannot hold one learner "
                f"batch ({self.batch_groups} groups of about {per_group:.0f} bytes); raise it "
                f"above {per_group * self.batch_groups:.0f}")

    def add(self, g: Group) -> None:
        slot = self.free.pop() if self.free else len(self.entries)
        e = Entry.of(g, self.seq)
        self.seq += 1
        self.entries[slot] = e
        self.age[slot] = None
        heapq.heappush(self.heap, (e.min_version, e.seq, slot))
        self.sampler.add(slot, self.priority_fn(g))
        self.size += len(g)
        self.nbytes += e.nbytes
        self.unused += 1

    def episodes(self) -> set[str]:
        return {t.episode for e in self.entries.values() for t in e.group}

    def fit_capacity(self, reserve_bytes: int = 0) -> None:
        """Evict the oldest groups (counted) while over either capacity."""
        while self.entries and (self.size > self.capacity or (
                self.capacity_bytes and self.nbytes + reserve_bytes > self.capacity_bytes)):
            self._remove(next(iter(self.age)), "evicted_capacity")

    def _remove(self, slot: int, reason: str) -> Entry:
        e = self.entries.pop(slot)
        del self.age[slot]
        self.sampler.remove(slot)
        self.free.append(slot)
        self.size -= len(e.group)
        self.nbytes -= e.nbytes
        self.unused -= e.uses == 0
        self.fates[reason] += len(e.group)
        return e

    # -- the learner's side ---------------------------------------------------------------------

    def available(self, version: int) -> int:
        """Groups update `version` may take, after dropping (counted) those older than
        version - max_staleness. The heap's top is the oldest group; items of groups already
        gone are skipped."""
        oldest_ok = version - self.max_staleness
        while self.heap and self.heap[0][0] < oldest_ok:
            _, seq, slot = heapq.heappop(self.heap)
            e = self.entries.get(slot)
            if e is not None and e.seq == seq:
                self._remove(slot, "evicted_staleness")
        if len(self.heap) > 2 * len(self.entries) + 1024:  # too many dead items: rebuild
            self.heap = [(e.min_version, e.seq, s) for s, e in self.entries.items()]
            heapq.heapify(self.heap)
        return len(self.entries)

    def take(self, version: int, n: int) -> tuple[list[Entry], np.ndarray | None]:
        """n distinct groups picked by the sampler, and its per-group importance weights (or
        None); a group used `max_reuse` times is retired."""
        slots, weights = self.sampler.sample(n)
        entries = [self.entries[slot] for slot in slots]
        for slot, e in zip(slots, entries):
            e.uses += 1
            self.unused -= e.uses == 1
            self.reuse_hist[e.uses] += 1
            if e.uses >= self.max_reuse:
                self._remove(slot, "retired")
        return entries, weights
