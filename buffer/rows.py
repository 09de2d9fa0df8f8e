"""Row-mode storage: batches sized in rows, so a learner step does not grow with episode length
(`learner.batch_rows`).

Reads: groups from `ReplayBuffer.add`. Writes: the rows of a batch (`take`); drops counted in
this store's `fates`: `evicted_capacity`, `retired` (trained once). The
members are the `Store` protocol's (store.py).

A group of long episodes can hold thousands of rows (one per segment), more than one learner
step should take. So each row's advantage is computed as its group arrives, from the group's
episodes (`advantage`, an `algorithms.advantages.GroupAdvantage`), and rows are handed out
oldest first, `batch_rows` at a time: a group's rows may be spread over several steps. Every
row is trained once. The staleness bound paces admission: a group starts only while the rows
ahead of it (stored, and expected from the groups in flight) would be consumed within
`max_staleness` versions. Nothing is evicted for
staleness: a group of long episodes arrives after many versions by nature, and a burst of
arrivals can overshoot the pacing; their rows are trained with the loss's correction (or masked,
`buffer.stale_tokens`), counted either way (`staleness/beyond_bound_frac`), so no episode is
dropped for its length. Capacity is in rows and in bytes; beyond either the oldest groups go,
counted, but never the newest (a group bigger than the capacity is held alone).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from offpolicy.buffer.bound import Entry
from offpolicy.buffer.ledger import STORE_FATES
from offpolicy.buffer.samplers import pass_rate
from offpolicy.buffer.store import Group, episodes_of, fresh_version, rows_in


@dataclass
class _Stored:
    chunks: deque          # the group's episodes' packed rows (`Segments`) not taken yet
    fresh: int             # `fresh_version` of the group
    pass_rate: float
    seq: int
    taken: int = 0         # rows of the first chunk already handed out


class RowStore:
    SETTINGS = ("batch_rows", "max_staleness", "capacity", "capacity_bytes", "advantage")

    def __init__(self, batch_rows: int, max_staleness: int, capacity: int,
                 capacity_bytes: int = 0, advantage=None):
        self.batch_rows, self.max_staleness = batch_rows, max_staleness
        self.capacity, self.capacity_bytes, self.advantage = capacity, capacity_bytes, advantage
        self.fates = dict.fromkeys(STORE_FATES, 0)
        self.queue: deque[_Stored] = deque()
        self.seq = 0
        self.rows_per_group = 0.0  # recent rows per arriving group (EMA): what one in flight brings
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
        """(None, groups) for as many of `n_groups` as fit: the rows ahead of them (stored, and
        those the `reserved` groups in flight will bring, at the recent rows per group, or the
        segments they already sent, `pending_rows`, if more) must be consumed within the
        staleness bound of an actor at `version` (it loads `published` first). At least one
        when nothing is ahead; None: wait."""
        ahead = self.size + max(reserved * self.rows_per_group, pending_rows)
        last = max(version, published) + self.max_staleness  # the last update that may take it
        room = (last - next_version + 1) * self.batch_rows - ahead
        if room <= 0:
            return (None, 1) if not ahead else None
        fit = int(room // self.rows_per_group) if self.rows_per_group else n_groups
        return None, max(1, min(n_groups, fit))

    def release(self, version: int | None, n_groups: int) -> None:
        """Reservations are the buffer's count alone."""

    def release_all(self) -> None:
        """Nothing is on order per version."""

    # -- storage --------------------------------------------------------------------------------

    def check_fit(self, groups: list[Group]) -> None:
        """A byte capacity below one learner batch of rows would evict every row before the
        learner could take it: fail with the size it needs."""
        rows = sum(rows_in(g) for g in groups)
        if not self.capacity_bytes or not rows:
            return
        per_row = sum(c.nbytes for g in groups for c in g) / rows
        if per_row * self.batch_rows > self.capacity_bytes:
            raise ValueError(
                f"buffer.capacity_bytes: {self.capacity_bytes} bytes cannot hold one learner "
                f"batch ({self.batch_rows} rows of about {per_row:.0f} bytes); raise it above "
                f"{per_row * self.batch_rows:.0f}")

    def step_signal(self, g: Group) -> bool:
        """Whether a group whose episodes all got the same reward still carries a signal: some
        segment's advantage is not 0 (`learner.credit` dense or gigpo). Assigns them."""
        if self.advantage.credit.name == "broadcast":
            return False
        self._assign(g)
        return any(bool(np.any(np.abs(c.advantages) > 1e-6)) for c in g)

    def add(self, g: Group) -> None:
        """Store a group of packed episodes (`Segments`), each row given its advantage."""
        if any(c.advantages is None for c in g):
            self._assign(g)
        self.queue.append(_Stored(deque(g), fresh_version(g), pass_rate(g), self.seq))
        self.seq += 1
        rows = rows_in(g)
        self.rows_per_group += (rows - self.rows_per_group) * (1.0 if self.seq == 1 else 0.2)
        self.size += rows
        self.nbytes += sum(c.nbytes for c in g)

    def _assign(self, g: Group) -> None:
        """Each row's advantage: the group's episode advantages spread by `credit`."""
        episodes = list(episodes_of(g).values())
        rewards = np.array([c[0].reward for c in episodes], dtype=np.float64)
        tokens = np.array([sum(x.policy_tokens() for x in c) for c in episodes],
                          dtype=np.float64)
        scores = [np.concatenate([x.row_scores() for x in c]) for c in episodes]
        contexts = ([[k for x in c for k in x.contexts()] for c in episodes]
                    if self.advantage.credit.name == "gigpo" else None)
        for chunks, adv in zip(episodes, self.advantage.rows(rewards, tokens, scores, contexts)):
            start = 0
            for c in chunks:
                c.advantages, start = adv[start:start + len(c)], start + len(c)

    def episodes(self) -> set[str]:
        return {c.episode_id for s in self.queue for c in s.chunks}

    def fit_capacity(self, reserve_bytes: int = 0) -> None:
        """Drop the oldest groups (counted) while over either capacity, never the newest: a
        group of long episodes bigger than the whole capacity is held alone and trained, not
        lost on arrival (the capacity bounds the backlog, not one group)."""
        while len(self.queue) > 1 and (self.size > self.capacity or (
                self.capacity_bytes and self.nbytes + reserve_bytes > self.capacity_bytes)):
            stored = self.queue.popleft()
            left = rows_in(stored.chunks) - stored.taken
            self.size -= left
            self.nbytes -= sum(c.nbytes for c in stored.chunks)
            self.fates["evicted_capacity"] += left

    # -- the learner's side ---------------------------------------------------------------------

    def available(self, version: int) -> int:
        """Rows update `version` may take: every stored one (see the module doc)."""
        return self.size

    def take(self, version: int, n: int) -> tuple[list[Entry], None]:
        """The n oldest rows, as one entry per group they come from; each is used once. A
        chunk's bytes leave the store when its last row does."""
        entries, left = [], n
        while left:
            stored = self.queue[0]
            rows = []
            while left and stored.chunks:
                chunk = stored.chunks[0]
                k = min(left, len(chunk) - stored.taken)
                rows += chunk.rows(stored.taken, stored.taken + k)
                stored.taken += k
                left -= k
                if stored.taken == len(chunk):
                    stored.chunks.popleft()
                    stored.taken = 0
                    self.nbytes -= chunk.nbytes
            entries.append(Entry(rows, stored.seq, stored.fresh, sum(t.nbytes for t in rows),
                                 stored.pass_rate, 1))
            if not stored.chunks:
                self.queue.popleft()
        self.size -= n
        self.fates["retired"] += n
        self.reuse_hist[1] += len(entries)
        return entries, None
