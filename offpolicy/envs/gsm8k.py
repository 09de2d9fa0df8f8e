"""Built-in task `gsm8k`: grade-school math word problems from a local JSONL file.

Reads: `env.kwargs.path`, one JSON object per line with `question` and `answer`, where the
answer ends in `#### <number>` (the GSM8K format; nothing is downloaded). Writes nothing.
Reward 1.0 when the last number of the completion (the one after `####` if it writes one)
equals the reference number. Eval problems are a fixed held-out draw from the same file.
"""

from __future__ import annotations

import json
import random
import re
from functools import partial
from pathlib import Path

from offpolicy.envs import SingleTurnEnv, register_env

PROMPT = ("Solve the problem. Think step by step, then give the final answer as "
          "'#### <number>'.\n\nProblem: {question}\nSolution:")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_ROWS: dict[str, list[dict]] = {}


def load_rows(path: str) -> list[dict]:
    """The file's problems as {"prompt", "answer"}; a one-line error when it is unusable."""
    if path not in _ROWS:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(f"env.kwargs.path: no such file: {path}")
        rows = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                answer = final_number(row["answer"].split("####")[-1])
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"env.kwargs.path: {path} line {n}: {e}") from None
            if answer is None:
                raise ValueError(f"env.kwargs.path: {path} line {n}: answer has no number")
            rows.append({"question": row["question"], "answer": answer})
        if not rows:
            raise ValueError(f"env.kwargs.path: {path} holds no problems")
        _ROWS[path] = rows
    return _ROWS[path]


def final_number(text: str) -> float | None:
    """The number after the last `####`, else the last number in `text`; None if there is none."""
    found = _NUMBER.findall(text.split("####")[-1]) or _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def math_reward(text: str, answer: float) -> float:
    got = final_number(text)
    return float(got is not None and abs(got - answer) < 1e-6)


def draw(rng: random.Random, rows: list[dict], template: str) -> dict:
    row = rows[rng.randrange(len(rows))]
    return {"prompt": template.format(question=row["question"]), "answer": row["answer"]}


def make_gsm8k(split: str = "train", path: str = "", template: str = PROMPT,
               eval_size: int = 200) -> SingleTurnEnv:
    rows = load_rows(path)
    return SingleTurnEnv(f"gsm8k:{path}", partial(draw, rows=rows, template=template),
                         math_reward, split=split, eval_size=min(eval_size, len(rows) // 2))


register_env("gsm8k", make_gsm8k)
