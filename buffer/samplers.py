"""Samplers and priorities of the replay buffer: which stored groups the learner sees next.

Reads: slot numbers and priorities from `ReplayBuffer` (which owns the groups themselves).
Writes: nothing; `sample(n)` returns n distinct slots and, for prioritized replay, the
importance weights that undo its sampling bias.

A sampler indexes slots, not groups, so storage, eviction and staleness stay in one place
(`replay.py`) and a sampler is a few dozen lines:
- `fifo`: the oldest first (a queue; with `max_reuse` 1 every group is used once, in order);
- `uniform`: any stored group with equal probability (classic replay);
- `prioritized`: probability proportional to priority ** alpha through a sum tree, O(log n)
  per add, remove and draw (Schaul et al. 2016, "Prioritized Experience Replay"); each sampled
  trajectory carries the weight (N * P(i)) ** -beta / max, which the learner multiplies into
  its advantage.

Priorities are plain functions of a group, registered by name like tasks and losses.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import OrderedDict
from typing import Callable, Protocol

import numpy as np

from offpolicy.algorithms.advantages import grpo
from offpolicy.buffer.store import Group, episode_rewards
from offpolicy.core.registry import Registry

# -- priorities -----------------------------------------------------------------------------------

PriorityFn = Callable[[Group], float]
PRIORITIES: Registry[PriorityFn] = Registry("buffer.priority")
register_priority = PRIORITIES.register  # @register_priority("name") on fn(group) -> float


def pass_rate(group: Group) -> float:
    """Share of the group's episodes that passed: rewards are read as pass probabilities,
    clipped to [0, 1] (verifiable rewards are 1 for a correct answer and 0 otherwise)."""
    rewards = episode_rewards(group)
    return sum(min(max(r, 0.0), 1.0) for r in rewards) / len(rewards)


def binary_entropy(p: float) -> float:
    """Bits of information in one pass/fail outcome with pass rate p: 1 at p = 0.5, 0 at 0 or 1."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


@register_priority("pass_rate")
def pass_rate_priority(group: Group) -> float:
    """4 p (1 - p) of the group's pass rate p: 1 at p = 0.5, where a sample carries the most
    information about which answers are better, falling to 0 for all-pass or all-fail groups."""
    p = pass_rate(group)
    return 4.0 * p * (1.0 - p)


@register_priority("advantage")
def advantage_priority(group: Group) -> float:
    """Mean absolute GRPO advantage of the group (0 when every reward is equal)."""
    rewards = np.array(episode_rewards(group), dtype=np.float64)
    return float(np.abs(grpo(rewards, np.zeros(len(rewards), dtype=np.int64))).mean())


# -- samplers -------------------------------------------------------------------------------------


class Sampler(Protocol):
    def add(self, slot: int, priority: float) -> None: ...

    def remove(self, slot: int) -> None: ...

    def sample(self, n: int) -> tuple[list[int], np.ndarray | None]: ...

    def slots(self) -> list[int]:
        """Stored slots in the order that re-adding them rebuilds this sampler exactly."""

    def __len__(self) -> int: ...


class FifoSampler:
    """The n oldest slots. Insertion order lives in an OrderedDict: O(1) add, remove, peek."""

    def __init__(self, **_) -> None:
        self.order: OrderedDict[int, None] = OrderedDict()

    def add(self, slot: int, priority: float) -> None:
        self.order[slot] = None

    def remove(self, slot: int) -> None:
        del self.order[slot]

    def sample(self, n: int) -> tuple[list[int], None]:
        return list(itertools.islice(self.order, n)), None

    def slots(self) -> list[int]:
        return list(self.order)

    def __len__(self) -> int:
        return len(self.order)


class UniformSampler:
    """n distinct slots, each equally likely. A dense list plus positions: O(1) add and remove
    (the last slot moves into the hole)."""

    def __init__(self, seed: int = 0, **_) -> None:
        self.dense: list[int] = []
        self.pos: dict[int, int] = {}
        self.rng = random.Random(seed)

    def add(self, slot: int, priority: float) -> None:
        self.pos[slot] = len(self.dense)
        self.dense.append(slot)

    def remove(self, slot: int) -> None:
        i, last = self.pos.pop(slot), self.dense.pop()
        if last != slot:
            self.dense[i], self.pos[last] = last, i

    def sample(self, n: int) -> tuple[list[int], None]:
        return [self.dense[i] for i in self.rng.sample(range(len(self.dense)), n)], None

    def slots(self) -> list[int]:
        return list(self.dense)

    def __len__(self) -> int:
        return len(self.dense)


class SumTree:
    """Non-negative values of slots 0..cap-1 in a complete binary tree whose inner nodes hold the
    sums of their children: `set` and `find` walk one root-to-leaf path, O(log cap)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.cap = 1 << max(0, capacity - 1).bit_length()
        self.tree = [0.0] * (2 * self.cap)  # node i has children 2i, 2i + 1; leaves from cap

    def _grow(self) -> None:
        leaves = self.tree[self.cap:]
        self.cap *= 2
        self.tree = [0.0] * self.cap + leaves + [0.0] * (self.cap - len(leaves))
        for i in range(self.cap - 1, 0, -1):
            self.tree[i] = self.tree[2 * i] + self.tree[2 * i + 1]

    def set(self, slot: int, value: float) -> None:
        while slot >= self.cap:
            self._grow()
        i = slot + self.cap
        self.tree[i] = value
        i >>= 1
        while i:  # recomputing sums (not adding deltas) keeps rounding from drifting
            self.tree[i] = self.tree[2 * i] + self.tree[2 * i + 1]
            i >>= 1

    def get(self, slot: int) -> float:
        return self.tree[slot + self.cap]

    @property
    def total(self) -> float:
        return self.tree[1]

    def find(self, u: float) -> int:
        """The slot whose cumulative range [sum before it, sum through it) holds u."""
        i, tree = 1, self.tree
        while i < self.cap:
            left = tree[2 * i]
            if u < left or tree[2 * i + 1] <= 0.0:  # rounding must never land on an empty side
                i = 2 * i
            else:
                u -= left
                i = 2 * i + 1
        return i - self.cap


class PrioritizedSampler:
    """P(slot) = p ** alpha / sum; n distinct slots per call, drawn one at a time with the drawn
    ones set to 0 until the call ends. Weights use each slot's probability before the call."""

    def __init__(self, seed: int = 0, alpha: float = 0.6, beta: float = 0.4,
                 eps: float = 0.01, **_) -> None:
        self.tree, self.n = SumTree(), 0
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.rng = random.Random(seed)

    def add(self, slot: int, priority: float) -> None:
        # eps keeps every stored group reachable (a priority of 0 would never be replayed)
        self.tree.set(slot, (priority + self.eps) ** self.alpha)
        self.n += 1

    def remove(self, slot: int) -> None:
        self.tree.set(slot, 0.0)
        self.n -= 1

    def sample(self, n: int) -> tuple[list[int], np.ndarray]:
        total = self.tree.total
        slots, values = [], []
        for _ in range(n):
            slot = self.tree.find(self.rng.random() * self.tree.total)
            slots.append(slot)
            values.append(self.tree.get(slot))
            self.tree.set(slot, 0.0)
        for slot, v in zip(slots, values):
            self.tree.set(slot, v)
        w = (self.n * np.asarray(values) / total) ** -self.beta
        return slots, (w / w.max()).astype(np.float32)

    def slots(self) -> list[int]:
        t = self.tree
        return [i for i in range(t.cap) if t.tree[t.cap + i] > 0.0]

    def __len__(self) -> int:
        return self.n


SAMPLERS: Registry[Callable[..., Sampler]] = Registry("buffer.sampler")


def register_sampler(name: str, factory: Callable[..., Sampler]) -> None:
    """Make `factory(seed=..., alpha=..., beta=...)` available as `buffer.sampler: <name>`
    (a factory takes the keywords it needs and ignores the rest: `**_`)."""
    SAMPLERS.register(name, factory)


register_sampler("fifo", FifoSampler)
register_sampler("uniform", UniformSampler)
register_sampler("prioritized", PrioritizedSampler)
