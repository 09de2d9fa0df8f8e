"""`env.curriculum`: move an integer environment knob (an episode's length) to hold the
training pass rate near a target.

Reads: the rewards of finished training episodes, with the knob's value they started at.
Writes: nothing; the actor asks `kwargs()` for each new group's environments and reports
`value` and `pass_rate` with its counts (the learner logs them as `curriculum/...`).

Information per sample peaks near a 50% pass rate: a group whose episodes all pass or all fail
carries no advantage. With one reward at the end of L calls that each succeed with probability
p, the pass rate is p^L, so a fixed length is either too short to matter or too long to ever
pass. The curriculum starts at `start` and, after every `window` episodes finished at the
current value, multiplies it by `factor` when their pass rate was above `target + band` and
divides it when below `target - band` (between 1 and `max`). Episodes started at an earlier
value do not count towards the current one's window. One curriculum per actor.
"""

from __future__ import annotations

import math
from functools import partial


class Curriculum:
    def __init__(self, cfg, top: int):
        self.cfg, self.top = cfg, top
        self.value = min(cfg.start, top)
        self.seen = self.passed = 0
        self.last_rate = math.nan  # the last full window's pass rate
        self.moves = 0

    @classmethod
    def of(cls, env_cfg) -> "Curriculum | None":
        """`env.curriculum` of an EnvConfig; None when it is off."""
        cur = env_cfg.curriculum
        return cls(cur, cur.max or env_cfg.kwargs[cur.knob]) if cur.knob else None

    def kwargs(self) -> dict:
        """The knob for a new group's environments."""
        return {self.cfg.knob: self.value}

    def start(self, group, make_env):
        """A new group starts at the current value (`group.level`); returns its env factory."""
        group.level = self.value
        return partial(make_env, **self.kwargs())

    @property
    def pass_rate(self) -> float:
        """The current window's pass rate so far, or the last full window's."""
        return self.passed / self.seen if self.seen else self.last_rate

    def record(self, value: int, rewards: list[float], counts: dict | None = None) -> None:
        """A group started at `value` finished with these episode rewards; `counts` (the
        actor's) gets `curriculum_value` and `curriculum_pass_rate`."""
        self._record(value, rewards)
        if counts is not None:
            counts["curriculum_value"], counts["curriculum_pass_rate"] = self.value, self.pass_rate

    def _record(self, value: int, rewards: list[float]) -> None:
        if value != self.value:
            return
        self.seen += len(rewards)
        self.passed += sum(r >= self.cfg.pass_reward for r in rewards)
        if self.seen < self.cfg.window:
            return
        rate, c = self.passed / self.seen, self.cfg
        self.last_rate, self.seen, self.passed = rate, 0, 0
        if rate > c.target + c.band and self.value < self.top:
            self.value = min(self.top, max(self.value + 1, round(self.value * c.factor)))
        elif rate < c.target - c.band and self.value > 1:
            self.value = max(1, min(self.value - 1, round(self.value / c.factor)))
        else:
            return
        self.moves += 1

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("value", "seen", "passed", "last_rate", "moves")}

    def restore(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
