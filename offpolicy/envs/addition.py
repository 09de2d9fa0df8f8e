"""Built-in task `addition`: add two n-digit numbers, answer written least-significant digit first.

Reads/writes nothing. Prompt "47+85=", target "231" (132 reversed), then end-of-sequence.
Reversed digits let a tiny model produce each digit from the carry it just wrote, which makes
the task learnable on a CPU in minutes; the plain order takes many times longer. With `pad`
(the default) operands are zero-padded to `digits` and the answer to `digits + 1` characters
("07+45=" -> "250"), so every digit sits at a fixed position: a tiny model learns it faster.
"""

from __future__ import annotations

import random
from functools import partial

from offpolicy.envs import SingleTurnEnv, register_env


def addition_problem(rng: random.Random, digits: int = 2, pad: bool = True) -> dict:
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    if pad:
        return {"prompt": f"{a:0{digits}d}+{b:0{digits}d}=",
                "answer": f"{a + b:0{digits + 1}d}"[::-1]}
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)[::-1]}


def without_carries(problem: dict, digits: int = 2, pad: bool = True) -> str:
    """The classic mistake: each column's sum mod 10, carries dropped ("07+45=" -> "240"
    where "250" is right), written like the answer. Equals the answer when no column carries."""
    a, b = (int(x) for x in problem["prompt"].rstrip("=").split("+"))
    n = sum(((a // 10 ** i + b // 10 ** i) % 10) * 10 ** i for i in range(digits))
    return f"{n:0{digits + 1}d}"[::-1] if pad else str(n)[::-1]


def exact_match(text: str, answer: str) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, is exactly the answer."""
    return float(text.strip() == answer)


def make_addition(split: str = "train", digits: int = 2, pad: bool = True,
                  eval_size: int = 200) -> SingleTurnEnv:
    return SingleTurnEnv(f"addition{digits}{'p' if pad else ''}",
                         partial(addition_problem, digits=digits, pad=pad),
                         exact_match, split=split, eval_size=eval_size, solution=str,
                         flawed=partial(without_carries, digits=digits, pad=pad))


register_env("addition", make_addition)
