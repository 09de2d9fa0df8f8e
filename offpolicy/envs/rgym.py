"""Built-in adapter `reasoning_gym`: any reasoning-gym dataset as a single-turn environment.

Reads nothing (reasoning-gym generates its problems procedurally). Writes nothing.
`env.kwargs.dataset` names the dataset (`leg_counting`, `basic_arithmetic`, ... the package
lists over 100); every other key of `env.kwargs` goes to that dataset's config. The prompt is
the dataset's question in `template`; the completion is scored by the dataset's own
`score_answer` (0 to 1). Eval problems are held out as for every single-turn task. Needs
`pip install "offpolicy[envs]"`.
"""

from __future__ import annotations

import random
from functools import partial

from offpolicy.envs import SingleTurnEnv, register_env

TEMPLATE = "{question}\nAnswer:"
_DATASETS: dict[str, object] = {}


def _dataset(name: str, config: dict):
    """The reasoning-gym dataset `name` (built once per process; items are generated lazily)."""
    key = f"{name}:{sorted(config.items())}"
    if key not in _DATASETS:
        try:
            import reasoning_gym
        except ImportError:
            raise ValueError("env 'reasoning_gym' needs reasoning-gym: "
                             "pip install 'offpolicy[envs]'") from None
        if name not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"env.kwargs.dataset: unknown reasoning-gym dataset '{name}'; "
                             f"e.g. {', '.join(sorted(reasoning_gym.factory.DATASETS)[:8])}, ...")
        try:
            _DATASETS[key] = reasoning_gym.create_dataset(name, seed=0, size=2**31 - 1, **config)
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"env.kwargs: reasoning-gym '{name}' rejects {config}: {e}") from None
    return _DATASETS[key]


def _draw(rng: random.Random, ds, template: str) -> dict:
    entry = ds[rng.randrange(len(ds))]
    return {"prompt": template.format(question=entry["question"]), "answer": entry}


def _score(ds, text: str, entry: dict) -> float:
    return float(ds.score_answer(text.strip(), entry) or 0.0)


def make_reasoning_gym(split: str = "train", dataset_name: str = "", template: str = TEMPLATE,
                       eval_size: int = 200, **config) -> SingleTurnEnv:
    ds = _dataset(dataset_name, config)
    return SingleTurnEnv(f"reasoning_gym:{dataset_name}:{sorted(config.items())}",
                         partial(_draw, ds=ds, template=template), partial(_score, ds),
                         split=split, eval_size=eval_size, solution=lambda e: str(e["answer"]))


def _factory(split: str = "train", dataset: str = "", **kwargs) -> SingleTurnEnv:
    if not dataset:
        raise ValueError("env.kwargs.dataset: name a reasoning-gym dataset, e.g. leg_counting")
    return make_reasoning_gym(split, dataset, **kwargs)


register_env("reasoning_gym", _factory)
