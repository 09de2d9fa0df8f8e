"""The buffer's ledger: where every episode went, so that none goes missing silently.

Reads: the buffer's events (admitted, arrived, dropped by an actor, lost with a dead actor, in
flight when the run ended) and, at `summary`, what became of the arrived rows (the buffer's
`filtered`, the store's fates: retired, evicted). Writes: its own `counts` and `summary()`:
the check that admitted = arrived + env_errors + lost + unfinished + in flight, in episodes,
and that added = filtered + retired + evicted + in the buffer, in rows (a row is an episode,
or one segment of a long one).

Each count has one owner: the ledger counts admission and delivery (`COUNTS`), the buffer what
arrives (added rows, episodes, filtered), the store what leaves it (`STORE_FATES`).

An actor may have many groups in flight (the continuous actor refills each free slot). Each
actor incarnation (`Incarnation`: a restarted actor is a new one) owes the groups it was
admitted for until it adds them; when a newer incarnation of the same actor shows up, the older
one died and its groups are lost.
"""

from __future__ import annotations

from collections import defaultdict

from offpolicy.core.types import Incarnation

COUNTS = ("admitted", "env_errors", "lost", "unfinished", "in_flight")
"""In episodes: admitted groups end up arrived, dropped by the actor (env_errors), lost with a
dead actor, unfinished when the run ended, or are still in flight."""
STORE_FATES = ("retired", "evicted_staleness", "evicted_capacity", "evicted_surplus")
"""What a store counts as rows leave it (bound.py, lag.py, rows.py)."""


class Ledger:
    def __init__(self, group_size: int):
        self.group_size = group_size
        self.counts = dict.fromkeys(COUNTS, 0)
        # the groups each incarnation was admitted for and has not added yet, by lag-mode
        # work-order version (None in bound mode)
        self.outstanding: dict[Incarnation, dict[int | None, int]] = {}
        self.reports: dict[Incarnation, dict] = {}  # each incarnation's last reported counts
        self.orphaned = 0  # episodes in flight at a restored snapshot no actor took on yet

    def order(self, n_groups: int, actor: Incarnation | None, version: int | None) -> None:
        """`actor` starts n_groups groups (for lag-mode work order `version`)."""
        episodes = n_groups * self.group_size
        self.counts["admitted"] += episodes
        self.counts["in_flight"] += episodes
        if actor is not None:
            owed = self.outstanding.setdefault(actor, defaultdict(int))
            owed[version] += n_groups

    def dead_incarnations(self, actor: Incarnation) -> list[Incarnation]:
        """Earlier incarnations of `actor`'s actor that still owe groups: they died."""
        return [k for k in self.outstanding if k.actor == actor.actor and k != actor]

    def lose(self, actor: Incarnation, fate: str = "lost") -> dict[int | None, int]:
        """`actor` is dead (`lost`), or the run ended (`unfinished`): its groups will never
        arrive. Returns the groups owed by version, whose reservations the buffer releases."""
        owed = self.outstanding.pop(actor)
        episodes = sum(owed.values()) * self.group_size
        self.counts[fate] += episodes
        self.counts["in_flight"] -= episodes
        return owed

    def arrived(self, reserved: int, episodes: int, actor: Incarnation | None,
                version: int | None, report: dict | None) -> None:
        """`reserved` admitted groups ended with `episodes` episodes arriving (the actor dropped
        the rest: an environment failed)."""
        if reserved:
            self.counts["in_flight"] -= reserved * self.group_size
            self.counts["env_errors"] += reserved * self.group_size - episodes
        if actor is not None:
            owed = self.outstanding.get(actor)
            if owed is not None:
                owed[version] -= reserved
                if owed[version] <= 0:
                    del owed[version]
                if not owed:
                    del self.outstanding[actor]
            if report is not None:
                self.reports[actor] = report

    def orphan_in_flight(self) -> None:
        """After a restore: the groups in flight at the snapshot belonged to processes that
        are gone; they wait for an actor to take them on (`adopt`), `settle` counts the rest
        lost."""
        self.outstanding.clear()
        self.orphaned = self.counts["in_flight"]

    def adopt(self, owed: dict[int | None, int], actor: Incarnation) -> None:
        """`actor` goes on with groups in flight at the snapshot (`owed`, by version)."""
        mine = self.outstanding.setdefault(actor, defaultdict(int))
        for version, n in owed.items():
            mine[version] += n
            self.orphaned -= n * self.group_size

    def settle(self) -> None:
        """Every actor has restored: the groups none took on are lost."""
        orphaned, self.orphaned = getattr(self, "orphaned", 0), 0
        self.counts["lost"] += orphaned
        self.counts["in_flight"] -= orphaned

    def summary(self, added: int, episodes: int, filtered: int, store_fates: dict[str, int],
                in_buffer: int) -> dict:
        """Where every episode went, given what arrived (`episodes`, in `added` rows, of which
        `filtered` were dropped on arrival) and the store's fates (rows); `balanced` is the
        check that nothing went missing."""
        c = self.counts
        fates = {"filtered": filtered, **{k: store_fates[k] for k in STORE_FATES},
                 "in_buffer": in_buffer}
        out = {"admitted": c["admitted"], "episodes": episodes, "added": added,
               "env_errors": c["env_errors"], "lost": c["lost"], "unfinished": c["unfinished"],
               "in_flight": c["in_flight"], **fates,
               "actors_reported": sum(r.get("trajectories", 0) for r in self.reports.values())}
        out["balanced"] = (
            added == sum(fates.values())
            and c["admitted"] == episodes + c["env_errors"] + c["lost"] + c["unfinished"]
            + c["in_flight"]
            # actors count what they sent; a group lost between actor and buffer shows here
            and (not self.reports or out["actors_reported"] == added))
        return out
