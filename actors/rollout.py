"""The rollout actor: generates GRPO groups with whatever weights it holds, forever.

Reads: published weights (WeightSync), admission decisions from the buffer.
Writes: groups of Trajectories to the buffer, every token tagged with its policy version.

Loop (one iteration = one batch of `prompts_per_batch` prompts x `group_size` samples):
  admit (may block: the staleness bound) -> load newest weights (safe point: no generation in
  flight) -> generate -> score in the environment -> add to the buffer.
With `engine.inflight_updates` (vLLM) the engine also polls for new weights between its steps,
so one trajectory's tokens can carry several versions.
A plain class: `offpolicy/launch.py` wraps it as a Ray actor; tests drive it directly.
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from pathlib import Path

import numpy as np
import torch

from offpolicy.actors.hf import HFEngine, SamplingParams
from offpolicy.config import Config
from offpolicy.envs import import_env_module, make_env
from offpolicy.models import load_tokenizer
from offpolicy.types import Trajectory


def _hf(cfg: Config, model_path: str, seed: int) -> HFEngine:
    return HFEngine(model_path, seed=seed)


def _vllm(cfg: Config, model_path: str, seed: int):
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


ENGINES = {"hf": _hf, "vllm": _vllm}


class RolloutActor:
    def __init__(self, cfg: Config, actor_id: int, model_path: str, buffer, weights):
        torch.set_num_threads(cfg.resources.torch_threads)
        self.cfg, self.actor_id = cfg, actor_id
        self.buffer, self.weights = buffer, weights
        self.engine = ENGINES[cfg.engine.name](cfg, model_path, cfg.run.seed * 1000 + actor_id)
        self.tokenizer = load_tokenizer(model_path)
        self.sampling = SamplingParams(cfg.engine.temperature, cfg.engine.top_p,
                                       cfg.engine.max_new_tokens, stop=tuple(cfg.engine.stop))
        self.rng = np.random.default_rng([cfg.run.seed, actor_id])
        import_env_module(cfg.env.module)
        self.make_env = partial(make_env, cfg.env.name, "train", eval_size=cfg.env.eval_size,
                                **cfg.env.kwargs)
        self.counts = {"batches": 0, "trajectories": 0, "env_errors": 0, "weight_loads": 0,
                       "inflight_loads": 0}
        self._next_poll = 0.0

    def run(self, max_batches: int | None = None) -> dict:
        """Generate until the buffer closes (or `max_batches`); returns this actor's counts."""
        while max_batches is None or self.counts["batches"] < max_batches:
            if self.one_batch() == "stop":
                break
        return self.counts

    def one_batch(self, timeout: float = 1.0) -> str:
        """Ask the buffer for admission (waiting up to `timeout`), load weights, generate one
        batch and add it. Returns "added", "refused" (not admitted in time) or "stop"."""
        n = self.cfg.rollout.prompts_per_batch
        decision = self.buffer.admit(self.engine.version, n, timeout)
        if decision["stop"]:
            return "stop"
        if "version" in decision:  # lag mode: a work order for exactly this version
            if decision["version"] != self.engine.version:
                self.sync_weights(want=decision["version"])
        elif decision["published"] > self.engine.version:
            self.sync_weights()
        if not decision["admitted"]:
            return "refused"
        reserved = decision.get("n_groups", n)
        groups = self.rollout_batch(reserved)
        self.buffer.add(groups, reserved, self.engine.version)
        self.counts["batches"] += 1
        return "added"

    def sync_weights(self, want: int | None = None) -> bool:
        """Load the newest published weights if newer than the engine's (or exactly `want`)."""
        for _ in range(3):
            got = self.weights.fetch(self.engine.version, want)
            if got is None:
                return False
            try:
                self.engine.load_weights(*got)
            except Exception:
                # FileSync keeps a few versions: when the learner has moved on and deleted the
                # folder before it was read, fetch again; anything else is a real error.
                if isinstance(got[1], str) and not Path(got[1]).exists():
                    continue
                raise
            self.counts["weight_loads"] += 1
            return True
        raise RuntimeError("weights: the published folder vanished 3 times in a row")

    def weight_rpc(self, method: str, *args) -> None:
        """NCCLSync's calls into the engine (a second Ray thread of this actor; GPU only).

        `start_weight_update` takes the engine lock (the generation loop takes it for every
        step) and `finish_weight_update(version)` sets the version and releases it, so the
        weights and the version tag change together between two engine steps.
        """
        engine = self.engine
        if method == "start_weight_update":
            engine.lock.acquire()
        try:
            engine.llm.collective_rpc(method, args=args if method != "finish_weight_update"
                                      else ())
        except BaseException:
            if method in ("start_weight_update", "update_weights"):
                engine.lock.release()
            raise
        if method == "finish_weight_update":
            engine.version = args[0]
            self.counts["weight_loads"] += 1
            engine.lock.release()

    def _inflight_sync(self) -> None:
        """Between engine steps: load newer weights if the learner published any. Polls the
        weight store at most every 10 ms (one small Ray call) so fast steps are not slowed."""
        now = time.perf_counter()
        if now >= self._next_poll:
            self._next_poll = now + 0.01
            if self.sync_weights():
                self.counts["inflight_loads"] += 1

    def rollout_batch(self, n_prompts: int | None = None) -> list[list[Trajectory]]:
        """One engine call over n_prompts (default prompts_per_batch) x group_size prompts;
        returns whole groups."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        seeds = self.rng.integers(0, 2**31, size=n_prompts or cfg.rollout.prompts_per_batch)
        envs = [[self.make_env() for _ in range(G)] for _ in seeds]
        prompts = [[env.reset(int(s)) for env in group] for s, group in zip(seeds, envs)]
        prompt_ids = [self.tokenizer(p[0])["input_ids"] for p in prompts]
        t0 = time.perf_counter()
        completions = self.engine.generate(
            [ids for ids in prompt_ids for _ in range(G)], self.sampling,
            between_steps=self._inflight_sync if cfg.engine.inflight_updates else None)
        gen_s = (time.perf_counter() - t0) / len(completions)
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions],
                                            skip_special_tokens=True)
        groups = []
        for g, (seed, group_envs) in enumerate(zip(seeds, envs)):
            group, group_id = [], f"{self.actor_id}-{uuid.uuid4().hex[:12]}"
            prompt = np.asarray(prompt_ids[g], dtype=np.int32)
            for k, env in enumerate(group_envs):
                c = completions[g * G + k]
                t1 = time.perf_counter()
                try:
                    _, reward, _, info = env.step(texts[g * G + k])
                except Exception:  # a bad reward function costs its group, never the actor
                    self.counts["env_errors"] += 1
                    group = None
                    break
                T = len(c.token_ids)
                group.append(Trajectory(
                    id=f"{group_id}-{k}", group_id=group_id,
                    prompt_ids=prompt,
                    completion_ids=c.token_ids, loss_mask=np.ones(T, dtype=np.int8),
                    behavior_logprobs=c.logprobs, versions=c.versions,
                    reward=reward, env=cfg.env.name, finish_reason=c.finish_reason,
                    timings={"generate": gen_s, "env": time.perf_counter() - t1}, info=info))
            if group:
                groups.append(group)
                self.counts["trajectories"] += len(group)
        return groups
