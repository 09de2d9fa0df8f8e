"""The learner: sample a batch, correct for staleness, take an optimizer step, publish weights.

Reads: Batches from the buffer (blocking `sample(version)`).
Writes: weights (WeightSync) every `sync_every` steps, the published version to the buffer,
and a metrics dict per step (returned to the driver, which writes metrics.jsonl).

A plain class: `offpolicy/launch.py` wraps it as a Ray actor; tests call `step()` directly.
"""

from __future__ import annotations

import time

import torch

from offpolicy.advantages import ADVANTAGES
from offpolicy.config import Config
from offpolicy.losses import LOSSES, LossInputs, importance_diagnostics
from offpolicy.models import evaluate, load_policy, token_logprobs
from offpolicy.types import Batch
from offpolicy.weights import cpu_state


class Learner:
    def __init__(self, cfg: Config, model_path: str, buffer, weights):
        torch.set_num_threads(cfg.resources.torch_threads)
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.buffer, self.weights = cfg, buffer, weights
        self.model, self.tokenizer = load_policy(model_path)
        self.model.train()
        lc = cfg.learner
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lc.lr, betas=tuple(lc.betas),
                                     weight_decay=lc.weight_decay)
        self.loss_fn, self.advantage_fn = LOSSES[cfg.loss.name], ADVANTAGES[lc.advantage]
        self.version = 0  # optimizer steps taken; the base model is version 0
        self.samples = 0
        self.started = time.perf_counter()

    def step(self) -> dict:
        """One update. Blocks in the buffer until a batch for this version is ready."""
        t0 = time.perf_counter()
        batch = self._next_batch()
        t1 = time.perf_counter()
        cfg = self.cfg
        d = {k: torch.from_numpy(v) for k, v in batch.padded(self.tokenizer.pad_token_id).items()}
        mask = d["loss_mask"]                                                   # (B, T)
        adv = torch.from_numpy(self.advantage_fn(batch.rewards(), batch.group_index()))  # (B,)

        logprobs = token_logprobs(self.model, d["input_ids"], d["attention_mask"], d["targets"],
                                  cfg.engine.temperature)                       # (B, T)
        # One optimizer step per batch: the weights at the start of the step (the proximal
        # policy of decoupled losses) are the current ones, so no second forward is needed.
        inputs = LossInputs(logprobs=logprobs, behavior_logprobs=d["behavior_logprobs"],
                            advantages=adv[:, None].expand_as(logprobs), mask=mask,
                            proximal_logprobs=logprobs.detach())
        loss, loss_metrics = self.loss_fn(inputs, **cfg.loss.params)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.learner.grad_clip if cfg.learner.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.version += 1
        self.samples += len(batch)
        if self.version % cfg.learner.sync_every == 0:
            self.publish()
        t2 = time.perf_counter()

        staleness = (batch.version - d["versions"][mask.bool()]).float()
        rewards = batch.rewards()
        metrics = {
            "step": self.version,
            "learner/loss": loss.item(),
            "learner/grad_norm": grad_norm.item(),
            "learner/tokens": int(mask.sum().item()),
            "learner/batch_size": len(batch),
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/completion_len": float(mask.sum(1).mean().item()),
            "staleness/min": staleness.min().item(),
            "staleness/mean": staleness.mean().item(),
            "staleness/max": staleness.max().item(),
            "staleness/hist": {str(int(k)): int(n) for k, n in
                               zip(*torch.unique(staleness, return_counts=True))},
            **importance_diagnostics(logprobs.detach(), d["behavior_logprobs"], mask),
            **loss_metrics,
            **batch.stats,
            "time/wait_s": t1 - t0,
            "time/update_s": t2 - t1,
            "throughput/samples_per_s": self.samples / (time.perf_counter() - self.started),
        }
        return metrics

    def _next_batch(self) -> Batch:
        while True:
            batch = self.buffer.sample(self.version)
            if batch is not None:
                return batch
            if self.buffer.is_closed():
                raise RuntimeError("buffer closed while the learner waited for data")

    def publish(self) -> None:
        """Send the weights for `self.version` to actors; then tell the buffer (admission)."""
        self.weights.publish(cpu_state(self.model), self.version)
        self.buffer.publish(self.version)

    def save(self, path: str) -> None:
        """Write the current policy as a Hugging Face folder (loadable as `model.path`)."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def evaluate(self) -> float:
        """Greedy reward on the fixed held-out eval set with the current weights."""
        return evaluate(self.model, self.tokenizer, self.cfg.env,
                        list(range(self.cfg.env.eval_size)), self.cfg.engine.max_new_tokens)
