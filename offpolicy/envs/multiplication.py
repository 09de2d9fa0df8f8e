"""Built-in task `multiplication`: "What is 17 x 4? Answer with the number only." for
pretrained instruct models (use with `env.chat: true`).

Reads/writes nothing. The reward is 1 when the last integer in the completion is the product
("17 x 4 = 68" and "68" both pass), else 0: the model's own phrasing is left alone, its
arithmetic and its staying on task are what count. SmolLM2-135M-Instruct solves about 0.6 of
a in [2, 20] x b in [2, 9] greedily; its failures are mostly wrong products and answers that
drift off the question ("To solve this problem, we need to find the remainder ...").
"""

from __future__ import annotations

import random
import re
from functools import partial

from offpolicy.envs import SingleTurnEnv, register_env

INTEGER = re.compile(r"-?\d+")


def multiplication_problem(rng: random.Random, low: int = 2, high: int = 20,
                           low_b: int = 2, high_b: int = 9) -> dict:
    a, b = rng.randint(low, high), rng.randint(low_b, high_b)
    return {"prompt": f"What is {a} x {b}? Answer with the number only.", "answer": a * b}


def last_integer_matches(text: str, answer: int) -> float:
    """1.0 when the last integer in the completion (commas removed) is the answer."""
    found = INTEGER.findall(text.replace(",", ""))
    return float(bool(found) and int(found[-1]) == answer)


def make_multiplication(split: str = "train", low: int = 2, high: int = 20, low_b: int = 2,
                        high_b: int = 9, eval_size: int = 200) -> SingleTurnEnv:
    return SingleTurnEnv(f"multiplication{low}-{high}x{low_b}-{high_b}",
                         partial(multiplication_problem, low=low, high=high, low_b=low_b,
                                 high_b=high_b),
                         last_integer_matches, split=split, eval_size=eval_size, solution=str)


register_env("multiplication", make_multiplication)
