"""The buffer's ledger: where every episode went, so that none goes missing silently.

Reads: the buffer's events (admitted, added, dropped by an actor, lost with a dead actor) and,
at `summary`, what became of the added trajectories (the buffer's `filtered`, the store's
fates: retired, evicted). Writes: its own `counts` (in trajectories) and `summary()`, the check
that admitted = added + env_errors + lost + in_flight and that added = filtered + retired +
evicted + in the buffer.

Each count has one owner: the ledger counts admission and delivery (`COUNTS`), the buffer what
arrives (added, filtered), the store what leaves it (`STORE_FATES`).

An actor has one batch at a time. Each actor incarnation (`Incarnation`: a restarted actor is a
new one) owes the batch it was admitted for until it adds it; when a newer incarnation of the
same actor shows up, the older one died and its batch is lost.
"""

from __future__ import annotations

from offpolicy.core.types import Incarnation

COUNTS = ("admitted", "env_errors", "lost", "in_flight")
"""In episodes: admitted batches end up added, dropped by the actor (env_errors), lost with a
dead actor, or are still in flight."""
STORE_FATES = ("retired", "evicted_staleness", "evicted_capacity", "evicted_surplus")
"""What a store counts as trajectories leave it (bound.py, lag.py)."""


class Ledger:
    def __init__(self, group_size: int):
        self.group_size = group_size
        self.counts = dict.fromkeys(COUNTS, 0)
        # the batch each incarnation was admitted for and has not added yet:
        # (groups, lag-mode version or None)
        self.outstanding: dict[Incarnation, tuple[int, int | None]] = {}
        self.reports: dict[Incarnation, dict] = {}  # each incarnation's last reported counts

    def order(self, n_groups: int, actor: Incarnation | None, version: int | None) -> None:
        """`actor` starts n_groups groups (for lag-mode work order `version`)."""
        episodes = n_groups * self.group_size
        self.counts["admitted"] += episodes
        self.counts["in_flight"] += episodes
        if actor is not None:
            self.outstanding[actor] = (n_groups, version)

    def dead_incarnations(self, actor: Incarnation) -> list[Incarnation]:
        """Earlier incarnations of `actor`'s actor that still owe a batch: they died."""
        return [k for k in self.outstanding if k.actor == actor.actor and k != actor]

    def lose(self, actor: Incarnation) -> tuple[int, int | None]:
        """`actor` is dead: its batch will never arrive. Returns (groups, version) owed, whose
        reservation the buffer releases."""
        n_groups, version = self.outstanding.pop(actor)
        self.counts["lost"] += n_groups * self.group_size
        self.counts["in_flight"] -= n_groups * self.group_size
        return n_groups, version

    def arrived(self, reserved: int, n_groups: int, actor: Incarnation | None,
                report: dict | None) -> None:
        """An admitted batch of `reserved` groups arrived with `n_groups` of them (the actor
        dropped the rest: an environment failed)."""
        if reserved:
            self.counts["in_flight"] -= reserved * self.group_size
            self.counts["env_errors"] += (reserved - n_groups) * self.group_size
        if actor is not None:
            self.outstanding.pop(actor, None)
            if report is not None:
                self.reports[actor] = report

    def forget_in_flight(self) -> None:
        """After a restore: batches being generated at the snapshot belong to the processes
        that wrote it, and never arrive here."""
        self.outstanding.clear()
        self.counts["lost"] += self.counts["in_flight"]
        self.counts["in_flight"] = 0

    def summary(self, added: int, filtered: int, store_fates: dict[str, int],
                in_buffer: int) -> dict:
        """Where every episode went, in trajectories, given what arrived (`added`, of which
        `filtered` were dropped on arrival) and the store's fates; `balanced` is the check
        that nothing went missing."""
        c = self.counts
        fates = {"filtered": filtered, **{k: store_fates[k] for k in STORE_FATES},
                 "in_buffer": in_buffer}
        out = {"admitted": c["admitted"], "added": added, "env_errors": c["env_errors"],
               "lost": c["lost"], "in_flight": c["in_flight"], **fates,
               "actors_reported": sum(r.get("trajectories", 0) for r in self.reports.values())}
        out["balanced"] = (
            added == sum(fates.values())
            and c["admitted"] == added + c["env_errors"] + c["lost"] + c["in_flight"]
            # actors count what they sent; a group lost between actor and buffer shows here
            and (not self.reports or out["actors_reported"] == added))
        return out
