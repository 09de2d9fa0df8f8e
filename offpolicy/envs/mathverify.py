"""Built-in task `math`: arithmetic or a local JSONL of problems, answers checked by math-verify.

Reads: `env.kwargs.path` when set (one JSON object per line with `question` and `answer`, the
answer as a number or LaTeX); otherwise problems are drawn procedurally ("(7+12)*3-5="). Writes
nothing. The completion is graded by Hugging Face `math-verify`: both sides are parsed (LaTeX,
boxed answers, plain expressions) and compared symbolically, so "1/2", "0.5" and "\\frac{1}{2}"
all match. Needs `pip install "offpolicy[envs]"`.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from functools import partial
from pathlib import Path

from offpolicy.envs import SingleTurnEnv, register_env
from offpolicy.envs.gsm8k import draw

OPS = "+-*"
# On the actor's environment threads verify() turns math-verify's SIGALRM timeouts off (see
# there); its warning that it did so would repeat in every actor's log.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def arithmetic_problem(rng: random.Random, terms: int = 3, max_value: int = 20) -> dict:
    """An expression of `terms` integers in [0, max_value] with + - * and maybe parentheses."""
    expr = str(rng.randint(0, max_value))
    for i in range(terms - 1):
        expr = f"{expr}{rng.choice(OPS)}{rng.randint(0, max_value)}"
        if rng.random() < 0.3 and i < terms - 2:
            expr = f"({expr})"
    return {"prompt": f"{expr}=", "answer": str(eval(expr))}  # only digits, ops and parentheses


def verify(text: str, answer: str) -> float:
    """1.0 when math-verify finds the completion's final answer equal to the reference."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    # math-verify's own timeouts use SIGALRM, which only the main thread may set; on the
    # actor's environment threads `env.timeout_s` is the guard instead.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(answer if answer.startswith("$") else f"${answer}$", parsing_timeout=limit)
    got = parse(text, parsing_timeout=limit)
    return float(bool(gold) and bool(got) and mv_verify(gold, got, timeout_seconds=limit))


def load_problems(path: str) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"env.kwargs.path: no such file: {path}")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows.append({"question": row["question"], "answer": str(row["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"env.kwargs.path: {path} line {n}: {e!r}") from None
    if not rows:
        raise ValueError(f"env.kwargs.path: {path} holds no problems")
    return rows


def make_math(split: str = "train", path: str = "", terms: int = 3, max_value: int = 20,
              template: str = "{question}", eval_size: int = 200) -> SingleTurnEnv:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        raise ValueError("env 'math' needs math-verify: pip install 'offpolicy[envs]'") from None
    if path:
        rows = load_problems(path)
        problems = partial(draw, rows=rows, template=template)
        eval_size = min(eval_size, len(rows) // 2)
    else:
        problems = partial(arithmetic_problem, terms=terms, max_value=max_value)
    return SingleTurnEnv(f"math:{path or f'{terms}x{max_value}'}", problems, verify,
                         split=split, eval_size=eval_size, solution=str)


register_env("math", make_math)
