"""Environment API, registry and the single-turn task helper.

Reads: nothing. Writes: nothing. An environment is `reset(seed) -> prompt` (text, or a list of
chat messages) then `step(text) -> (observation or None, reward, done, info)`, one step per
policy call; the episode's reward is the sum of its steps'. Three ways to write one
(docs/environments.md):
- a single-turn task: a data source (seed -> prompt and answer) and a plain reward function,
  wrapped in `SingleTurnEnv`;
- a multi-turn conversation: each observation is appended to the conversation, which the next
  call continues (one growing row; `guess`);
- an episode of many calls (`segmented = True`): each observation is the whole context of the
  next call, built by the environment (a window, a carried state, a summary), and each call is a
  segment of its own (`long_addition`); or a plain Python function that calls
  `policy(prompt) -> text` as often as it likes (`function.register_episode`).
Optional members: `segmented`, `snapshot()` / `restore(state) -> next context` (episodes in
flight survive a resume), `close()` (the actor ended the episode early). Built-in tasks
register themselves on import.
"""

from __future__ import annotations

import importlib
import random
from typing import Any, Callable, Protocol

from offpolicy.core.errors import ConfigError
from offpolicy.core.registry import Registry


class Env(Protocol):
    def reset(self, seed: int) -> str | list[dict]:
        """The task `seed` picks; returns the first call's prompt."""

    def step(self, text: str) -> tuple[str | dict | None, float, bool, dict]:
        """The policy's text for the current call -> (observation, reward, done, info)."""


EnvFactory = Callable[..., Env]
ENVS: Registry[EnvFactory] = Registry("env.name")


def register_env(name: str, factory: EnvFactory) -> None:
    """Make `factory(split=..., **env.kwargs)` available as `env.name: <name>`."""
    ENVS.register(name, factory)


def make_env(name: str, split: str = "train", **kwargs: Any) -> Env:
    return ENVS.lookup(name)(split=split, **kwargs)


def import_env_module(module: str) -> None:
    """Import the user's task module (which registers its envs); a one-line error if missing."""
    if not module:
        return
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"env.module: cannot import '{module}': {e}") from None


def env_kwargs(env_cfg, split: str = "train") -> dict:
    """`env.kwargs`, with `env.eval_kwargs` over them for the eval split; for `env.dataset`
    the dataset's path, reward functions and weights besides."""
    data = ({"path": env_cfg.dataset, "reward_funcs": env_cfg.reward_funcs,
             "reward_weights": env_cfg.reward_weights} if env_cfg.dataset else {})
    return {**data, **env_cfg.kwargs, **(env_cfg.eval_kwargs if split == "eval" else {})}


def env_from_config(env_cfg, split: str = "train") -> Env:
    """The environment `env.name` with its kwargs for `split` and `env.eval_size`."""
    import_env_module(env_cfg.module)
    return make_env(env_cfg.name, split, eval_size=env_cfg.eval_size,
                    **env_kwargs(env_cfg, split))


def latency_sampler(spec: str) -> Callable[[random.Random], float]:
    """`env.latency` as a function rng -> seconds: "" (0), `fixed:S`, `uniform:LO,HI`,
    `lognormal:MEDIAN,SIGMA`. Raises ValueError naming the valid forms."""
    if not spec:
        return lambda rng: 0.0
    kind, _, args = spec.partition(":")
    try:
        vals = [float(x) for x in args.split(",")] if args else []
    except ValueError:
        vals = []
    forms = {"fixed": 1, "uniform": 2, "lognormal": 2}
    if kind not in forms or len(vals) != forms[kind] or min(vals) < 0:
        raise ValueError(f"'{spec}' is not one of fixed:S, uniform:LO,HI, lognormal:MEDIAN,SIGMA "
                         "(seconds, >= 0)")
    if kind == "fixed":
        return lambda rng: vals[0]
    if kind == "uniform":
        return lambda rng: rng.uniform(vals[0], vals[1])
    return lambda rng: vals[0] * rng.lognormvariate(0.0, vals[1])


class SingleTurnEnv:
    """One prompt, one answer, one reward.

    problems(rng) -> {"prompt": str, "answer": Any} draws a problem; reward(text, answer) scores
    a completion. The eval split is a fixed list of `eval_size` problems drawn with a seed of its
    own, and the train split never yields one of them, so eval rewards are held out.
    `solution(answer) -> str`, if given, is the target text used to warm up a tiny base model;
    `flawed(problem) -> str`, if given, a plausible systematic mistake on a problem (for
    addition: every carry dropped), which the warm-up mixes in (`model.tiny.flawed_share`).
    """

    def __init__(self, name: str, problems: Callable[[random.Random], dict],
                 reward: Callable[[str, Any], float], split: str = "train",
                 eval_size: int = 200, solution: Callable[[Any], str] | None = None,
                 flawed: Callable[[dict], str] | None = None):
        self.name, self.problems, self.reward_fn = name, problems, reward
        self.split, self.solution_fn, self.flawed_fn = split, solution, flawed
        self.eval_set, self._eval_prompts = _eval_problems(name, problems, eval_size)
        self.current: dict | None = None

    def reset(self, seed: int) -> str:
        if self.split == "eval":
            self.current = self.eval_set[seed % len(self.eval_set)]
        else:
            rng = random.Random(seed)
            for _ in range(1000):  # rejection keeps eval problems out of training
                self.current = self.problems(rng)
                if self.current["prompt"] not in self._eval_prompts:
                    break
            else:
                raise ValueError(f"env '{self.name}': 1000 draws all hit the {len(self.eval_set)} "
                                 "eval problems; the task has too few distinct problems for "
                                 "env.eval_size")
        return self.current["prompt"]

    def step(self, text: str) -> tuple[None, float, bool, dict]:
        assert self.current is not None, "step() before reset()"
        return None, float(self.reward_fn(text, self.current["answer"])), True, {}

    def solution(self) -> str:
        """The reference completion for the current problem (for supervised warm-up)."""
        if self.solution_fn is None:
            raise NotImplementedError(f"env '{self.name}' has no reference solutions")
        return self.solution_fn(self.current["answer"])

    def demonstration(self, flawed: bool = False) -> list[tuple[str, bool]]:
        """A warm-up episode as (text, written by the policy) pieces: here the solution, or
        with `flawed` the task's systematic mistake (NotImplementedError if it has none)."""
        if not flawed:
            return [(self.solution(), True)]
        if self.flawed_fn is None:
            raise NotImplementedError(f"env '{self.name}' has no flawed solutions")
        return [(self.flawed_fn(self.current), True)]


_EVAL_CACHE: dict[tuple, tuple[list[dict], set[str]]] = {}


def _eval_problems(name: str, problems: Callable, size: int) -> tuple[list[dict], set[str]]:
    """The fixed eval problems of a task and the set of their prompts (built once per process)."""
    key = (name, size)
    if key not in _EVAL_CACHE:
        rng = random.Random(f"eval/{name}")
        seen: dict[str, dict] = {}
        for _ in range(size * 100):
            p = problems(rng)
            seen.setdefault(p["prompt"], p)
            if len(seen) == size:
                break
        _EVAL_CACHE[key] = list(seen.values()), set(seen)
    return _EVAL_CACHE[key]


# The built-in tasks register themselves.
from offpolicy.envs import (addition, dataset, gsm8k, guess, long_addition,  # noqa: E402,F401
                            mathverify, multiplication, rgym)
