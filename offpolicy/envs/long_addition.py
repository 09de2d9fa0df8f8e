"""Built-in long-horizon task `long_addition`: add two long numbers a chunk per policy call,
the model carrying its own carry from call to call in text.

Reads/writes nothing. A task is two numbers of `calls` chunks of `digits` digits each and an
incoming carry. Call i (least significant chunk first) sees a fresh context, built by the
environment from the chunk and the carry the model itself wrote on the previous call:

    call 1:  "47+85+1="  ->  "331"     (47 + 85 + 1 = 133, written reversed: 3, 3, carry 1)
    call 2:  "02+60+1="  ->  "360"     (the carry 1 comes from the model's "331")

Each call is one segment (its own learner row). The answer is the (digits + 1)-digit sum written
least-significant digit first, its last digit the carry out; a malformed answer counts as wrong
and passes on carry 0. Reward `terminal` (the default): 1 at the end only if every call was right
(sparse, one reward for the whole episode); `dense`: 1 / calls for every right call (the
fraction right, a proxy). Every call's info holds `proxy`, 1.0 if that call was right (what
`learner.credit: dense` mixes in, the reward staying terminal); the last call's also
`calls_right`.

The episode length is a knob (`calls`, 1 to 100,000 or more); with `calls_max` above `calls`
each task draws its length log-uniformly from [calls, calls_max] (heavy-tailed lengths). Chunks
are drawn from the task's seed call by call, so an episode's state is a few numbers however long
it is (`snapshot` / `restore`: its episodes survive a resume). The tiny base model is built at
length 1 (`base_model_kwargs`), where it succeeds sometimes (its warm-up mixes in a flawed
solution that drops the carries), and shared by every length.
"""

from __future__ import annotations

import math
import random

from offpolicy.envs import register_env


class LongAdditionEnv:
    segmented = True
    """Each observation is the whole context of the next call (a new segment)."""
    base_model_kwargs = {"calls": 1, "calls_max": 0, "reward": "terminal"}
    """The setting the tiny base model is built at, whatever the run's length."""

    def __init__(self, split: str = "train", calls: int = 4, calls_max: int = 0,
                 digits: int = 2, reward: str = "terminal", eval_size: int = 200):
        if calls < 1 or digits < 1 or calls_max < 0:
            raise ValueError(f"long_addition: need calls >= 1, digits >= 1 and calls_max >= 0, "
                             f"got calls={calls}, digits={digits}, calls_max={calls_max}")
        if reward not in ("terminal", "dense"):
            raise ValueError(f"long_addition: reward '{reward}' is not terminal or dense")
        self.split, self.calls, self.calls_max = split, calls, calls_max
        self.digits, self.reward = digits, reward
        self.task, self.length, self.i, self.carry, self.right = "", 0, 0, 0, 0

    # -- the task ---------------------------------------------------------------------------------

    def _chunk(self, i: int) -> tuple[int, int]:
        rng = random.Random(f"{self.task}:{i}")
        return rng.randrange(10 ** self.digits), rng.randrange(10 ** self.digits)

    def _context(self) -> str:
        a, b = self._chunk(self.i)
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}+{self.carry}="

    def answer(self) -> str:
        """The right completion of the current call."""
        a, b = self._chunk(self.i)
        return f"{self.carry + a + b:0{self.digits + 1}d}"[::-1]

    def reset(self, seed: int) -> str:
        # the eval split's tasks live in a namespace of their own: never drawn for training
        self.task = f"{'e' if self.split == 'eval' else 't'}{seed}"
        rng = random.Random(f"{self.task}:task")
        self.length = self.calls
        if self.calls_max > self.calls:
            lo, hi = math.log(self.calls), math.log(self.calls_max + 1)
            self.length = min(self.calls_max, int(math.exp(rng.uniform(lo, hi))))
        self.carry, self.i, self.right = rng.randrange(2), 0, 0
        return self._context()

    def step(self, text: str) -> tuple[str | None, float, bool, dict]:
        text = text.strip()
        right = text == self.answer()
        self.right += right
        # the model's own carry goes on (its answer's last digit); a malformed one passes 0
        self.carry = int(text[-1]) if len(text) == self.digits + 1 and text[-1] in "01" else 0
        self.i += 1
        reward = right / self.length if self.reward == "dense" else 0.0
        if self.i < self.length:
            return self._context(), reward, False, {"proxy": float(right)}
        if self.reward == "terminal":
            reward = float(self.right == self.length)
        return None, reward, True, {"calls_right": self.right, "calls": self.length,
                                    "proxy": float(right)}

    # -- resume -----------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {"task": self.task, "length": self.length, "i": self.i, "carry": self.carry,
                "right": self.right}

    def restore(self, state: dict) -> str:
        """Continue a snapshot's episode; returns the context of its next call."""
        vars(self).update(state)
        return self._context()

    # -- the tiny base model's warm-up ------------------------------------------------------------

    def demonstration(self, flawed: bool = False) -> list[tuple[str, bool]]:
        """The current call's answer as a warm-up piece; with `flawed` the classic mistake:
        each column's digit with its carry dropped (the incoming carry kept)."""
        if not flawed:
            return [(self.answer(), True)]
        a, b = self._chunk(self.i)
        digits = [(a // 10 ** k + b // 10 ** k + (self.carry if k == 0 else 0)) % 10
                  for k in range(self.digits)]
        return [("".join(map(str, digits)) + "0", True)]


register_env("long_addition", LongAdditionEnv)
