"""Built-in multi-turn task `guess`: find a hidden number with higher/lower feedback.

Reads/writes nothing. The prompt is "?" plus the range ("?0-15:"); each turn the policy writes a
guess (then end-of-sequence) and the environment answers "<" (the number is smaller) or ">"
(larger) as an observation the policy must read, until the guess is right or `guesses` are used:

    ?0-15:  8<eos> <  4<eos> >  6<eos>          (number 6, found on the third guess)

Reward: 1 when found (sparse, at the end), minus `step_cost` for every wrong guess (a per-turn
reward). A group is one hidden number. The eval split plays every number once.
The tiny base model warms up on a mixture of two strategies that both respect the feedback
(`flawed_share` of the demonstrations, 70% by default, show the worse one):
- right: halve the interval still possible (guess its middle): finds one of 8 numbers in 3
  guesses 7 times in 8 (one of 16 in 4: 15 in 16);
- flawed: guess the smallest number still possible (a linear scan): 3 in 8 (4 in 16).
Greedy decoding follows the majority, the scan, so the base model succeeds sometimes (3 of the
8 numbers) and RL has the better strategy to bring forward. Both strategies are deterministic,
so the base model's greedy choice has a clear margin and does not hang on float noise (the
older warm-up, uniform guesses among the numbers still possible, made near-equal logits that
each CPU broke its own way).
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

    def reset(self, seed: int) -> str:
        eval_split = self.split == "eval"
        self.secret = seed % self.n if eval_split else random.Random(seed).randrange(self.n)
        self.turn = 0
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

    def demonstration(self, flawed: bool = False) -> list[tuple[str, bool]]:
        """A warm-up episode from the current reset: (text, written by the policy) pieces.
        Halving the interval still possible, or with `flawed` scanning it from the bottom."""
        lo, hi, pieces = 0, self.n - 1, []
        for _ in range(self.guesses):
            guess = lo if flawed else (lo + hi) // 2
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
