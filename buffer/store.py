"""The Store protocol: what the replay buffer asks of its storage engine, in any mode, and
what a stored group is made of.

Reads: nothing. Writes: nothing. `ReplayBuffer` (replay.py) holds one store and calls only
these members, under its lock. The implementations: `BoundStore` (bound.py, bounded
staleness, a sampler, capacity, reuse), `LagStore` (lag.py, work orders for the exact
version t - k) and `RowStore` (rows.py, batches sized in rows). A store counts what leaves it
in its own `fates` (the ledger's `STORE_FATES`); what arrives is the buffer's count.

A group is the rows of its episodes: one row per episode, or one per segment of an episode
made of many calls. The functions below see it episode by episode.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from offpolicy.core.types import Segments, Trajectory

Group = list
"""A group as stored: its rows as Trajectories (batches of whole groups), or its episodes'
rows packed as `Segments` (batches sized in rows: long episodes)."""


def rows_of(item: Trajectory | Segments) -> int:
    return len(item) if isinstance(item, Segments) else 1


def rows_in(group: Group) -> int:
    return sum(rows_of(x) for x in group)


def episodes_of(group: Group) -> dict[str, list]:
    """The group's items (rows, or packed segments) by episode, in order."""
    out: dict[str, list] = {}
    for x in group:
        out.setdefault(x.episode, []).append(x)
    return out


def _single_rows(group: Group) -> bool:
    """Every item a Trajectory that is a whole episode (the common case, kept fast)."""
    return all(isinstance(x, Trajectory) and not x.episode_id for x in group)


def episode_rewards(group: Group) -> list[float]:
    """One reward per episode (an episode's rows all carry its reward)."""
    if _single_rows(group):
        return [t.reward for t in group]
    return [items[0].reward for items in episodes_of(group).values()]


def fresh_version(group: Group) -> int:
    """The version the staleness bound measures a group by: the oldest policy token of each
    episode's last segment, the oldest over its episodes. For one-row episodes, their oldest
    token; a long episode's earlier segments outlast the bound by nature and are not what it
    measures (docs/long_episodes.md)."""
    if _single_rows(group):
        return min(t.min_version() for t in group)
    out = []
    for items in episodes_of(group).values():
        last = max(items, key=lambda x: x.first + len(x) if isinstance(x, Segments)
                   else x.segment)
        out.append(last.last_min_version() if isinstance(last, Segments)
                   else last.min_version())
    return min(out)


def episode_summary(items: list) -> tuple[int, int, int, int, float]:
    """(tokens, policy tokens, rows, versions spanned, wall seconds) of one episode's items."""
    tokens = policy = rows = 0
    lo, hi = None, None
    for x in items:
        if isinstance(x, Segments):
            tokens, policy, rows = tokens + x.tokens(), policy + x.policy_tokens(), rows + len(x)
            span = x.version_range()
        else:
            tokens, policy, rows = tokens + x.num_tokens, policy + x.policy_tokens(), rows + 1
            v = x.versions[x.loss_mask.astype(bool)]
            span = (int(v.min()), int(v.max())) if len(v) else None
        if span is not None:
            lo = span[0] if lo is None else min(lo, span[0])
            hi = span[1] if hi is None else max(hi, span[1])
    return tokens, policy, rows, (hi - lo) if lo is not None else 0, \
        float(items[-1].timings.get("wall", 0.0))


class Store(Protocol):
    SETTINGS: tuple[str, ...]
    """Attribute names that are constructor settings: a snapshot carries everything else,
    and a resumed run keeps its own settings."""
    fates: dict[str, int]
    """Trajectories that left the store, by reason: retired, evicted_staleness,
    evicted_capacity, evicted_surplus."""
    size: int
    """Trajectories stored."""
    nbytes: int
    """Bytes of the stored trajectories (`Trajectory.nbytes`)."""
    reuse_hist: dict[int, int]
    """Groups sampled for the n-th time, by n."""

    @property
    def groups(self) -> int:
        """Groups stored."""

    # actors
    def admit(self, n_groups: int, version: int, next_version: int, published: int,
              reserved: int, survival: float,
              pending_rows: int = 0) -> tuple[int | None, int] | None:
        """(work-order version or None, groups) for a batch an actor at `version` may start
        now, or None: wait. `survival` is the recent share of groups kept by filtering;
        `pending_rows` the segments of episodes in flight already in the buffer."""

    def release(self, version: int | None, n_groups: int) -> None:
        """`n_groups` of an order for `version` arrived or died: no longer on order."""

    def release_all(self) -> None:
        """Nothing is on order any more (after a restore)."""

    def check_fit(self, groups: list[Group]) -> None:
        """Raise ValueError when a learner batch of groups like these can never fit."""

    def add(self, group: Group) -> None:
        """Store one group (it passed the buffer's filter)."""

    def episodes(self) -> set[str]:
        """The ids of the episodes with rows stored."""

    def fit_capacity(self, reserve_bytes: int = 0) -> None:
        """Evict, counted, until within capacity, `reserve_bytes` of it taken elsewhere (the
        buffer's segments of episodes in flight)."""

    # the learner
    def available(self, version: int) -> int:
        """Groups update `version` may take now (evicting, counted, what it never will)."""

    def take(self, version: int, n: int) -> tuple[list, np.ndarray | None]:
        """n groups (`bound.Entry`s) for update `version` and their importance weights, or
        None for weights of 1."""

    # snapshot and restore
    def sampler_state(self) -> dict | None:
        """The sampler's order and random state, or None without a sampler."""

    def restore_sampler(self, state: dict | None) -> None:
        """Take over a snapshot's sampler order (this run's sampler settings)."""
