"""TRL's conventions: a dataset with a `prompt` column, scored by TRL-style reward functions.

Reads: `env.dataset`, a JSONL or parquet file or a saved Hugging Face `datasets` folder, once
per process. Writes: nothing.

A row's `prompt` is text or a list of chat messages (`{role, content}`); every other column
travels with it. `env.reward_funcs` are dotted paths to functions with TRL's signature,

    def reward(completions, **kwargs) -> list[float | None]

called with one completion at a time: `completions` is `[text]` for a text prompt and
`[[{"role": "assistant", "content": text}]]` for a chat prompt, `prompts` is `[prompt]`, and each
other column comes as a one-element list under its own name. A None (TRL: "not applicable")
counts 0. The episode's reward is the sum of the functions' rewards times `env.reward_weights`
(all 1 by default), as GRPOTrainer sums them. A function that raises is contained by the actor
like any environment error (`env_errors`).

Splits: a saved `DatasetDict` uses its `train` split for training and its `test` split (if any)
for eval; otherwise the first `env.eval_size` rows of a fixed shuffle are held out for eval
and never trained on.
"""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path
from typing import Any, Callable

from offpolicy.core.errors import ConfigError
from offpolicy.envs import register_env

_ROWS: dict[tuple[str, int], tuple[list[dict], list[dict]]] = {}


def load_rows(path: str, eval_size: int) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of the dataset at `path` (read once per process)."""
    key = (path, eval_size)
    if key not in _ROWS:
        train, test = _read(Path(path).expanduser())
        if not train or "prompt" not in train[0]:
            raise ConfigError(f"env.dataset: {path} has no rows with a 'prompt' column")
        if test is None:
            order = list(range(len(train)))
            random.Random(0).shuffle(order)
            if len(train) <= eval_size:
                raise ConfigError(f"env.dataset: {path} has {len(train)} rows, not more than "
                                  f"env.eval_size={eval_size} (held out for eval)")
            test = [train[i] for i in order[:eval_size]]
            train = [train[i] for i in order[eval_size:]]
        _ROWS[key] = (train, test[:eval_size])
    return _ROWS[key]


def _read(path: Path) -> tuple[list[dict], list[dict] | None]:
    """(rows, held-out rows or None) of a .jsonl / .parquet file or a `save_to_disk` folder."""
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"env.dataset: cannot load {path}: {str(e).splitlines()[0]}") \
                from None
        if isinstance(data, datasets.DatasetDict):
            test = data["test"].to_list() if "test" in data else None
            return data["train"].to_list(), test
        return data.to_list(), None
    if path.suffix == ".jsonl" and path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], None
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), None
    raise ConfigError(f"env.dataset: {path} is not a .jsonl or .parquet file or a saved "
                      "datasets folder")


def resolve_function(dotted: str) -> Callable:
    """`package.module.function` (or `package.module:function`) -> the function."""
    module, sep, name = dotted.replace(":", ".").rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name, None) if sep else None
    except ImportError as e:
        raise ConfigError(f"env.reward_funcs: cannot import '{module}': {e}") from None
    if not callable(fn):
        raise ConfigError(f"env.reward_funcs: '{dotted}' is not a function (write "
                          "module.function)")
    return fn


class DatasetEnv:
    """A single-turn episode per dataset row, scored by TRL-style reward functions."""

    def __init__(self, path: str, reward_funcs: list[str], reward_weights: list | None = None,
                 split: str = "train", eval_size: int = 200):
        train, test = load_rows(path, eval_size)
        self.rows = train if split == "train" else test
        self.split = split
        self.funcs = [resolve_function(f) for f in reward_funcs]
        self.weights = list(reward_weights or [1.0] * len(self.funcs))
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"{len(self.weights)} reward_weights for {len(self.funcs)} "
                             "reward_funcs")
        self.current: dict | None = None

    def reset(self, seed: int) -> str | list[dict]:
        i = seed % len(self.rows) if self.split == "eval" else random.Random(seed).randrange(
            len(self.rows))
        self.current = self.rows[i]
        return self.current["prompt"]

    def step(self, text: str) -> tuple[None, float, bool, dict]:
        row = self.current
        prompt = row["prompt"]
        completion: Any = text if isinstance(prompt, str) else [{"role": "assistant",
                                                                 "content": text}]
        columns = {k: [v] for k, v in row.items() if k != "prompt"}
        info, total = {}, 0.0
        for fn, w in zip(self.funcs, self.weights):
            got = fn(prompts=[prompt], completions=[completion], **columns)
            value = 0.0 if got is None or got[0] is None else float(got[0])
            info[f"reward/{getattr(fn, '__name__', 'reward')}"] = value
            total += w * value
        return None, total, True, info


register_env("dataset", lambda split="train", eval_size=200, **kw:
             DatasetEnv(split=split, eval_size=eval_size, **kw))
