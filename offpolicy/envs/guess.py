"""Built-in multi-turn task `guess`: find a hidden number with higher/lower feedback.

Reads/writes nothing. The prompt is "?" plus the range ("?0-15:"); each turn the policy writes a
guess (then end-of-sequence) and the environment answers "<" (the number is smaller) or ">"
(larger) as an observation the policy must read, until the guess is right or `guesses` are used:

    ?0-15:  8<eos> <  4<eos> >  6<eos>          (number 6, found on the third guess)

Reward: 1 when found (sparse, at the end), minus `step_cost` for every wrong guess (a per-turn
reward). A group is one hidden number. The eval split plays every number once.
The warm-up demonstrations guess uniformly among the numbers still possible: that finds one of
8 numbers in 3 guesses 61% of the time (one of 16 in 4: 58%), while halving the interval finds
88% (94%). So the tiny base model succeeds sometimes, and RL has a better strategy to discover.
"""

from __future__ import annotations

import random

from offpolicy.envs import register_env


class GuessEnv:
    def __init__(self, split: str = "train", n: int = 16, guesses: int = 4,
                 step_cost: float = 0.0, eval_size: int = 200):
        if n < 2 or guesses < 1:
            raise ValueError(f"guess: need n >= 2 and guesses >= 1, got n={n}, guesses={guesses}")
        self.split, self.n, self.guesses, self.step_cost = split, n, guesses, step_cost
        self.secret, self.turn = 0, 0
        self.rng = random.Random(0)

    def reset(self, seed: int) -> str:
        eval_split = self.split == "eval"
        self.secret = seed % self.n if eval_split else random.Random(seed).randrange(self.n)
        self.turn = 0
        self.rng = random.Random(seed + 1)
        return f"?0-{self.n - 1}:"

    def step(self, text: str) -> tuple[str | None, float, bool, dict]:
        self.turn += 1
        try:
            guess = int(text.strip())
        except ValueError:  # not a number: the episode ends, no reward
            return None, -self.step_cost, True, {"invalid": 1}
        if guess == self.secret:
            return None, 1.0, True, {"guesses": self.turn}
        if self.turn >= self.guesses:
            return None, -self.step_cost, True, {}
        return ("<" if self.secret < guess else ">"), -self.step_cost, False, {}

    def demonstration(self) -> list[tuple[str, bool]]:
        """A warm-up episode from the current reset: (text, written by the policy) pieces.

        Guesses uniformly among the numbers still consistent with the feedback. Plays a copy
        of the state, so the environment itself is left as reset() left it.
        """
        lo, hi, pieces = 0, self.n - 1, []
        for _ in range(self.guesses):
            guess = self.rng.randint(lo, hi)
            pieces.append((str(guess), True))
            if guess == self.secret:
                break
            if self.secret < guess:
                hi = guess - 1
            else:
                lo = guess + 1
            pieces.append(("<" if self.secret < guess else ">", False))
        if not pieces[-1][1]:
            pieces.pop()  # out of guesses: the last feedback is never shown
        return pieces


register_env("guess", GuessEnv)
