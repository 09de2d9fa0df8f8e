"""The rollout actor: generates GRPO groups with whatever weights it holds, forever.

Reads: published weights (WeightSync), admission decisions from the buffer.
Writes: groups of Trajectories to the buffer, every token tagged with its policy version.

Loop (one iteration = one batch of `prompts_per_batch` prompts x `group_size` samples):
  admit (may block: the staleness bound) -> load newest weights (safe point: no generation in
  flight) -> generate -> score in the environment -> add to the buffer.
A plain class: `offpolicy/launch.py` wraps it as a Ray actor; tests drive it directly.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import torch

from offpolicy.actors.hf import HFEngine, SamplingParams
from offpolicy.config import Config
from offpolicy.envs import env_from_config
from offpolicy.types import Trajectory


class RolloutActor:
    def __init__(self, cfg: Config, actor_id: int, model_path: str, buffer, weights):
        torch.set_num_threads(cfg.resources.torch_threads)
        self.cfg, self.actor_id = cfg, actor_id
        self.buffer, self.weights = buffer, weights
        self.engine = HFEngine(model_path, seed=cfg.run.seed * 1000 + actor_id)
        self.tokenizer = self.engine.tokenizer
        self.sampling = SamplingParams(cfg.engine.temperature, cfg.engine.top_p,
                                       cfg.engine.max_new_tokens)
        self.rng = np.random.default_rng([cfg.run.seed, actor_id])
        self.counts = {"batches": 0, "trajectories": 0, "env_errors": 0, "weight_loads": 0}

    def run(self, max_batches: int | None = None) -> dict:
        """Generate until the buffer closes (or `max_batches`); returns this actor's counts."""
        n = self.cfg.rollout.prompts_per_batch
        while max_batches is None or self.counts["batches"] < max_batches:
            decision = self.buffer.admit(self.engine.version, n)
            if decision["stop"]:
                break
            if decision["published"] > self.engine.version:
                self.sync_weights()
            if not decision["admitted"]:
                continue
            groups = self.rollout_batch()
            self.buffer.add(groups, n)
            self.counts["batches"] += 1
        return self.counts

    def sync_weights(self) -> None:
        got = self.weights.fetch(self.engine.version)
        if got is not None:
            self.engine.load_weights(*got)
            self.counts["weight_loads"] += 1

    def rollout_batch(self) -> list[list[Trajectory]]:
        """One engine call over prompts_per_batch x group_size; returns whole groups."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        seeds = self.rng.integers(0, 2**31, size=cfg.rollout.prompts_per_batch)
        envs = [[env_from_config(cfg.env) for _ in range(G)] for _ in seeds]
        prompts = [[env.reset(int(s)) for env in group] for s, group in zip(seeds, envs)]
        prompt_ids = [self.tokenizer(p[0])["input_ids"] for p in prompts]
        version = self.engine.version  # fixed for the whole call: weights only change between calls
        t0 = time.perf_counter()
        completions = self.engine.generate([ids for ids in prompt_ids for _ in range(G)],
                                           self.sampling)
        gen_s = (time.perf_counter() - t0) / len(completions)
        groups = []
        for g, (seed, group_envs) in enumerate(zip(seeds, envs)):
            group, group_id = [], f"{self.actor_id}-{uuid.uuid4().hex[:12]}"
            for k, env in enumerate(group_envs):
                c = completions[g * G + k]
                t1 = time.perf_counter()
                try:
                    text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                    _, reward, _, info = env.step(text)
                except Exception:  # a bad reward function costs its group, never the actor
                    self.counts["env_errors"] += 1
                    group = None
                    break
                T = len(c.token_ids)
                group.append(Trajectory(
                    id=f"{group_id}-{k}", group_id=group_id,
                    prompt_ids=np.asarray(prompt_ids[g], dtype=np.int32),
                    completion_ids=c.token_ids, loss_mask=np.ones(T, dtype=np.int8),
                    behavior_logprobs=c.logprobs, versions=np.full(T, version, dtype=np.int32),
                    reward=reward, env=cfg.env.name, finish_reason=c.finish_reason,
                    timings={"generate": gen_s, "env": time.perf_counter() - t1}, info=info))
            if group:
                groups.append(group)
                self.counts["trajectories"] += len(group)
        return groups
