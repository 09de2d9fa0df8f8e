"""The eval desk: the held-out evals the driver asks for, run by rollout actor 0.

Reads: requests from the driver, results from actor 0. Writes: nothing; the driver reads the
results back. In the Ray layout it is a small Ray actor beside the buffer; the serial layout
evaluates in place and needs none.

Evals run on actor 0's engine between its batches, never in the learner: the driver asks
(`request`), actor 0 checks the desk after each admission (`take`), loads the newest weights,
plays the eval set greedily and hands the result in (`report`); the driver collects finished
evals (`results`), each with the policy version it measured. An incarnation of actor 0 that
died while evaluating leaves the request open for the next one.
"""

from __future__ import annotations

from offpolicy.core.types import Incarnation


class EvalDesk:
    EVALUATOR = 0
    """The rollout actor that runs evals."""

    def __init__(self) -> None:
        self.wanted = False
        self.holder: Incarnation | None = None  # the incarnation evaluating now
        self.done: list[dict] = []

    def request(self) -> None:
        """The driver wants a held-out eval with the newest weights."""
        self.wanted = True

    def take(self, actor: Incarnation) -> bool:
        """Whether `actor` should run the requested eval now (actor 0 only)."""
        if actor.actor != self.EVALUATOR:
            return False
        if self.holder not in (None, actor):  # the incarnation evaluating died
            self.wanted, self.holder = True, None
        if not self.wanted:
            return False
        self.wanted, self.holder = False, actor
        return True

    def report(self, result: dict) -> None:
        """Actor 0's finished eval (`eval/reward`, `eval/version`, `eval/seconds`)."""
        self.done.append(result)
        self.holder = None

    def results(self) -> list[dict]:
        """The evals finished since the last call, oldest first."""
        done, self.done = self.done, []
        return done
