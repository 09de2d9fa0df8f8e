"""Row-mode storage: batches sized in rows, so a learner step does not grow with episode length
(`learner.batch_rows`).

Reads: groups from `ReplayBuffer.add`. Writes: the rows of a batch (`take`); drops counted in
this store's `fates`: `evicted_capacity`, `retired` (trained once). The
members are the `Store` protocol's (store.py).

A group of long episodes can hold thousands of rows (one per segment), more than one learner
step should take. So each row's advantage is computed as its group arrives, from the group's
episodes (`advantage`, an `algorithms.advantages.GroupAdvantage`), and rows are handed out
oldest first, `batch_rows` at a time: a group's rows may be spread over several steps. Every
row is trained once. The staleness bound paces admission: actors are held off while the rows
generated and not yet trained (stored, and the segments of episodes in flight) would be
consumed more than `max_staleness` versions later. Nothing is evicted for
staleness: a group of long episodes arrives after many versions by nature, and a burst of
arrivals can overshoot the pacing; their rows are trained with the loss's correction (or masked,
`buffer.stale_tokens`), counted either way (`staleness/beyond_bound_frac`), so no episode is
dropped for its length. Capacity is in rows and in bytes; beyond either the oldest rows go,
counted.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

from offpolicy.buffer.bound import Entry
from offpolicy.buffer.ledger import STORE_FATES
from offpolicy.buffer.samplers import pass_rate
from offpolicy.buffer.store import Group, fresh_version


@dataclass
class _Stored:
    rows: deque            # the group's rows not taken yet, in order
    fresh: int             # `fresh_version` of the group
    pass_rate: float
    seq: int


class RowStore:
    SETTINGS = ("batch_rows", "max_staleness", "capacity", "capacity_bytes", "advantage")

    def __init__(self, batch_rows: int, max_staleness: int, capacity: int,
                 capacity_bytes: int = 0, advantage=None):
        self.batch_rows, self.max_staleness = batch_rows, max_staleness
        self.capacity, self.capacity_bytes, self.advantage = capacity, capacity_bytes, advantage
        self.fates = dict.fromkeys(STORE_FATES, 0)
        self.queue: deque[_Stored] = deque()
        self.seq = 0
        self.size = 0     # rows stored
        self.nbytes = 0
        self.reuse_hist: dict[int, int] = defaultdict(int)

    @property
    def groups(self) -> int:
        return len(self.queue)

    def sampler_state(self) -> None:
        """No sampler: rows go oldest first."""

    def restore_sampler(self, state: None) -> None:
        pass

    # -- admission ------------------------------------------------------------------------------

    def admit(self, n_groups: int, version: int, next_version: int, published: int,
              reserved: int, survival: float, pending_rows: int = 0) -> tuple[None, int] | None:
        """(None, n_groups) while the rows generated and not trained (stored, and the
        segments episodes in flight have sent, `pending_rows`) would be consumed within the
        staleness bound of an actor at `version` (it loads `published` first), else None
        (wait): the backlog stays near what the learner takes in `max_staleness` steps."""
        consumed_at = next_version + (self.size + pending_rows) // self.batch_rows
        if consumed_at - max(version, published) <= self.max_staleness:
            return None, n_groups
        return None

    def release(self, version: int | None, n_groups: int) -> None:
        """Reservations are the buffer's count alone."""

    def release_all(self) -> None:
        """Nothing is on order per version."""

    # -- storage --------------------------------------------------------------------------------

    def check_fit(self, groups: list[Group]) -> None:
        """A byte capacity below one learner batch of rows would evict every row before the
        learner could take it: fail with the size it needs."""
        rows = [t for g in groups for t in g]
        if not self.capacity_bytes or not rows:
            return
        per_row = sum(t.nbytes for t in rows) / len(rows)
        if per_row * self.batch_rows > self.capacity_bytes:
            raise ValueError(
                f"buffer.capacity_bytes: {self.capacity_bytes} bytes cannot hold one learner "
                f"batch ({self.batch_rows} rows of about {per_row:.0f} bytes); raise it above "
                f"{per_row * self.batch_rows:.0f}")

    def add(self, g: Group) -> None:
        for t, a in zip(g, self.advantage(g)):
            t.advantage = float(a)
        self.queue.append(_Stored(deque(g), fresh_version(g), pass_rate(g), self.seq))
        self.seq += 1
        self.size += len(g)
        self.nbytes += sum(t.nbytes for t in g)

    def rows(self):
        return (t for s in self.queue for t in s.rows)

    def fit_capacity(self, reserve_bytes: int = 0) -> None:
        """Drop the oldest rows (counted) while over either capacity."""
        while self.queue and (self.size > self.capacity or (
                self.capacity_bytes and self.nbytes + reserve_bytes > self.capacity_bytes)):
            self._drop(self.queue.popleft(), "evicted_capacity")

    def _drop(self, stored: _Stored, reason: str) -> None:
        self.size -= len(stored.rows)
        self.nbytes -= sum(t.nbytes for t in stored.rows)
        self.fates[reason] += len(stored.rows)

    # -- the learner's side ---------------------------------------------------------------------

    def available(self, version: int) -> int:
        """Rows update `version` may take: every stored one (see the module doc)."""
        return self.size

    def take(self, version: int, n: int) -> tuple[list[Entry], None]:
        """The n oldest rows, as one entry per group they come from; each is used once."""
        entries, left = [], n
        while left:
            stored = self.queue[0]
            rows = [stored.rows.popleft() for _ in range(min(left, len(stored.rows)))]
            left -= len(rows)
            entries.append(Entry(rows, stored.seq, stored.fresh, sum(t.nbytes for t in rows),
                                 stored.pass_rate, 1))
            if not stored.rows:
                self.queue.popleft()
        self.size -= n
        self.nbytes -= sum(e.nbytes for e in entries)
        self.fates["retired"] += n
        self.reuse_hist[1] += len(entries)
        return entries, None
