"""The desk: what the driver asks of the rollout actors, answered between their engine calls.

Reads: requests from the driver, answers from the actors. Writes: nothing; the driver reads the
answers back. In the Ray layout it is a small Ray actor beside the buffer; the serial layout
calls its actors directly and needs none.

- Evals run on actor 0's engine, never in the learner: the driver asks (`request`), actor 0
  checks the desk between engine calls (`take`), loads the newest weights, plays the eval set
  greedily and hands the result in (`report`); the driver collects finished evals (`results`),
  each with the policy version it measured. An incarnation of actor 0 that died while
  evaluating leaves the request open for the next one.
- A checkpoint holds every actor (`hold`): each writes a snapshot of its episodes in flight into
  the folder the desk names (`holding`), says so (`held_by`) and waits until the driver has
  saved the learner and the buffer (`release`), so the three agree on every episode.
"""

from __future__ import annotations

from offpolicy.core.types import Incarnation


class Desk:
    EVALUATOR = 0
    """The rollout actor that runs evals."""

    def __init__(self) -> None:
        self.wanted, self.weights = False, ""
        self.holder: Incarnation | None = None  # the incarnation evaluating now
        self.done: list[dict] = []
        self.folder: str | None = None          # a checkpoint's hold: where snapshots go
        self.held: set[int] = set()             # the actors that wrote theirs

    # -- evals ------------------------------------------------------------------------------------

    def request(self, weights: str = "") -> None:
        """The driver wants a held-out eval with the newest weights, or with those in the
        folder `weights` (the base model, `eval.base: end`)."""
        self.wanted, self.weights = True, weights

    def take(self, actor: Incarnation) -> dict | None:
        """The eval `actor` should run now (actor 0 only), `{"weights": folder or ""}`, or
        None."""
        if actor.actor != self.EVALUATOR:
            return None
        if self.holder not in (None, actor):  # the incarnation evaluating died
            self.wanted, self.holder = True, None
        if not self.wanted:
            return None
        self.wanted, self.holder = False, actor
        return {"weights": self.weights}

    def report(self, result: dict) -> None:
        """Actor 0's finished eval (`eval/reward`, `eval/version`, `eval/seconds`)."""
        self.done.append(result)
        self.holder = None

    def results(self) -> list[dict]:
        """The evals finished since the last call, oldest first."""
        done, self.done = self.done, []
        return done

    # -- checkpoint holds -------------------------------------------------------------------------

    def hold(self, folder: str) -> None:
        """Every actor: write your snapshot into `folder`, then wait for `release`."""
        self.folder, self.held = folder, set()

    def holding(self, actor: Incarnation) -> str | None:
        """The folder `actor` should write its snapshot to now, or None."""
        return self.folder if self.folder is not None and actor.actor not in self.held else None

    def held_by(self, actor_id: int) -> None:
        self.held.add(actor_id)

    def held_count(self) -> int:
        return len(self.held)

    def is_holding(self) -> bool:
        return self.folder is not None

    def release(self) -> None:
        self.folder = None
