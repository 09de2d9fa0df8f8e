"""The learner: sample a batch, correct for staleness, take an optimizer step, publish weights.

Reads: Batches from the buffer (blocking `sample(version)`).
Writes: weights (WeightSync) every `sync_every` steps, the published version to the buffer,
and a metrics dict per step (returned to the driver, which writes metrics.jsonl).

The Learner holds the algorithm: advantages, the loss (its `LossSpec`, resolved once), the
proximal pass, the optimizer step. How several workers share a step (rank, row shares, sums,
the gather before publishing, saving) is its `Parallel` strategy's (parallel.py); the
engine/learner log-prob check is `ParityCheck` (parity.py). A plain class:
`offpolicy/runtime/ray_roles.py` wraps it as a Ray actor; tests call `step()` directly.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from offpolicy.algorithms.advantages import ADVANTAGES, episode_advantages
from offpolicy.algorithms.logprobs import first_target
from offpolicy.algorithms.losses import (LOSSES, LossInputs, importance_diagnostics,
                                         kl_penalty, regularized)
from offpolicy.config.plan import RunPlan
from offpolicy.config.schema import Config
from offpolicy.core.machine import keep_freed_memory, peak_rss_mb
from offpolicy.core.types import Batch, PaddedBatch
from offpolicy.models.loading import frozen_in_bf16, load_policy
from offpolicy.weights.sync import cpu_state

from offpolicy.learner import lora
from offpolicy.learner.parallel import make_parallel, reference_thread
from offpolicy.learner.parity import ParityCheck
from offpolicy.learner.schedule import ess_scale, lr_at
from offpolicy.learner.shared_prompt import sequence_logprobs
from offpolicy.learner.step_metrics import (Spans, importance_by_position, staleness_by_position,
                                            to_numbers)


class Learner:
    def __init__(self, cfg: Config, model_path: str, buffer, weights,
                 plan: RunPlan | None = None):
        """`plan`: the run's (built from `cfg` when not given: tests and benchmarks)."""
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.buffer, self.weights = cfg, buffer, weights
        self.plan = plan = plan or RunPlan.of(cfg)
        lora_cfg = cfg.model.lora
        base = lora.base_of(model_path) if lora_cfg.r else model_path
        model, self.tokenizer = load_policy(base, attention=cfg.learner.attention)
        self.device = torch.device("cuda" if cfg.resources.learner_gpus > 0  # Ray gave it one
                                   and torch.cuda.is_available() else "cpu")
        self.parallel = make_parallel(cfg.learner, self.device)
        if self.device.type == "cpu" and cfg.resources.keep_freed_memory:
            keep_freed_memory()
        # bf16: autocast in every scoring pass; frozen weights held in bf16, trained ones fp32
        self.bf16 = bf16 = cfg.learner.precision == "bf16"
        frozen = frozen_in_bf16 if bf16 else (lambda m: m)
        self.loss = LOSSES.lookup(cfg.loss.name)
        # the loss's own parameters, and its own advantage estimator's (oapl, asymre, vcpo)
        self.loss_params, self.advantage_params = self.loss.split(cfg.loss.params)
        self.advantage_fn = self.loss.advantage or ADVANTAGES.lookup(cfg.learner.advantage)
        self.needs_proximal = cfg.learner.minibatches > 1 or self.loss.proximal
        # The frozen reference of the KL penalty, loaded only when the penalty is on.
        # With LoRA on the reference's own base, the base with the adapters off serves.
        self.reference = None
        ref_path = cfg.loss.kl_reference or base
        self.reference_is_base = bool(cfg.loss.kl_coef > 0 and lora_cfg.r and
                                      Path(ref_path).resolve() == Path(base).resolve())
        if cfg.loss.kl_coef > 0 and not self.reference_is_base:
            self.reference = load_policy(ref_path, attention=cfg.learner.attention)[0]
            frozen(self.reference.to(self.device).eval().requires_grad_(False))
        self.beside = (reference_thread(cfg.learner, self.device, self.autocast)
                       if self.reference is not None else None)
        self.version = 0  # optimizer steps taken; the base model is version 0
        self.published_version = 0  # actors start with the base model
        self.samples = self.tokens = 0  # rows and policy tokens trained
        self.nonfinite_skipped = 0  # steps skipped for a NaN/inf loss or gradient
        self.warmed = False  # `warm_up` ran (while the first batch was generated)
        self.started = time.perf_counter()
        leader = self.parallel.leader
        # Before the model is placed (sharded, each worker then holds 1/N of it): the parity
        # check's copy and version 0's weights.
        self.parity = None
        if plan.parity_window and leader:
            self.parity = ParityCheck(model, self.device, cfg.engine.logprob_check_every,
                                      plan.parity_window)
            self.parity.keep(0, cpu_state(model))
        if plan.lag is not None and leader:  # lag mode: actors may ask for version 0 later
            weights.publish(cpu_state(model), 0)
        if lora_cfg.r:  # float32 adapters on the frozen base (a LoRA checkpoint's, on resume)
            model = lora.wrap(frozen(model), lora_cfg, model_path)
        self.parallel.place(model)
        self.model = model.train()
        if leader:  # NCCLSync meets the actors' engines here; the others need nothing
            weights.connect(self.model)
        lc = cfg.learner
        # fused: one kernel over all parameters (unsharded; DTensor shards take foreach)
        self.opt = torch.optim.AdamW(lora.trainable(self.model), lr=lc.lr,
                                     betas=tuple(lc.betas), weight_decay=lc.weight_decay,
                                     **({"fused": True} if lc.sharding == "none" else {}))

    def step(self) -> dict:
        """One version: a sampled batch, `learner.minibatches` optimizer steps on it, and a
        publish when due. Blocks in the buffer until a batch for this version is ready."""
        spans = Spans()
        with spans("wait"):
            batch = self.parallel.share(self._sample() if self.parallel.leader else None)
        with spans("prepare"):
            d = batch.padded(self.tokenizer.pad_token_id).map(torch.from_numpy)   # (B, T) each
            stale = self._stale_tokens(d, batch.version)
        parity = {}
        if self.parity is not None and self.parity.due(self.version):
            with spans("parity"):
                parity = self.parity.measure(d, self.version, self._score)
        loss, logprobs, tensors = self._update(d, batch, spans)
        if self.version % self.plan.sync_every == 0 and self.parallel.publishes:
            with spans("publish"):
                self.publish()
        return self._metrics(batch, d, logprobs, {**tensors, **stale, "learner/loss": loss},
                             parity, spans)

    def _stale_tokens(self, d: PaddedBatch, version: int) -> dict[str, torch.Tensor]:
        """Policy tokens older than the staleness bound: a long episode outlasts it by nature
        (its first segments were sampled many versions ago). They are trained with the loss's
        correction (`buffer.stale_tokens: train`) or left out of the loss (`mask`); either way
        counted. Returns the `staleness/beyond_bound*` metrics."""
        beyond = d.loss_mask.bool() & (d.versions < version - self.plan.max_staleness)
        out = {"staleness/beyond_bound_frac": beyond.sum() / d.loss_mask.sum().clamp(min=1)}
        if self.plan.stale_tokens == "mask":
            d.loss_mask = d.loss_mask * ~beyond
            out["staleness/masked_tokens"] = beyond.sum()
        return out

    def _sample(self) -> Batch:
        """The leader waits for this version's batch."""
        while (batch := self.buffer.sample(self.version)) is None:
            if self.buffer.is_closed():
                raise RuntimeError("buffer closed while the learner waited for data")
            if not self.warmed and self.parallel.world == 1:  # (workers would need peers)
                self.warm_up()
        return batch

    def warm_up(self) -> None:
        """While the first batch is generated: AdamW's state (two zeroed copies of the trained
        weights, 1 GB for SmolLM2's full fine-tuning), so the first step does not take it.
        Nothing else changes. A forward and backward of a made-up batch used to follow it: once
        the engine's first call took 2 s it no longer fit before the first batch, and SmolLM2's
        first step came 1-4 s later with it (docs/real_models.md, "A fast start")."""
        self.warmed = True
        if self.opt.state:  # (resumed: the checkpoint's moments must not move)
            return
        # AdamW allocates its state in its first step: take it at lr 0 on zero gradients
        # (moments stay 0), then reset its step counts.
        for p in lora.trainable(self.model):
            p.grad = torch.zeros_like(p)
        lrs = [g["lr"] for g in self.opt.param_groups]
        for g in self.opt.param_groups:
            g["lr"] = 0.0
        self.opt.step()
        for g, lr in zip(self.opt.param_groups, lrs):
            g["lr"] = lr
        for state in self.opt.state.values():
            state["step"].zero_()
        self.opt.zero_grad(set_to_none=True)

    def _update(self, d: PaddedBatch, batch: Batch, spans: Spans):
        """`learner.minibatches` optimizer steps on disjoint shares of the batch's rows (a
        fixed shuffle per version), then the version advances by one: a version is one
        sampled batch however many steps it took, so staleness and lag mode count batches.
        The proximal policy (the weights at the start of the batch) is scored once, before
        the first step, when a step needs it. Returns (loss, (B, T) log-probs, metric tensors),
        the loss and metrics averaged over the steps."""
        if self.needs_proximal:
            with spans("proximal"):
                d.proximal_logprobs = self._proximal(d)                            # (B, T)
        with spans("prepare"):
            adv = self._advantages(batch, d)                                       # (B,)
        lr, n = lr_at(self.cfg.learner, self.version), self.cfg.learner.minibatches
        order = torch.arange(len(adv))
        if n > 1:
            seed = self.cfg.run.seed * 1_000_003 + self.version
            order = torch.randperm(len(adv), generator=torch.Generator().manual_seed(seed))
        logprobs, loss, tensors = torch.zeros(d.targets.shape), 0.0, {}
        for rows in order.tensor_split(n):
            sub = d.rows(rows)
            self.opt.zero_grad(set_to_none=True)
            with spans("backward"):  # forward and backward, micro-batch by micro-batch
                part_loss, logprobs[rows], part = self._backward(sub, adv[rows])
            with spans("optimizer"):
                self._optimizer_step(sub, logprobs[rows], part_loss, lr, part)
            loss = loss + part_loss / n
            for k, v in part.items():
                tensors[k] = tensors.get(k, 0.0) + v.double() / n
        tensors.update(importance_by_position(batch, d, logprobs, adv, self.loss,
                                              self.loss_params))
        self.version += 1
        return loss, logprobs, tensors

    def _optimizer_step(self, d: PaddedBatch, logprobs: torch.Tensor, loss: torch.Tensor,
                        lr: float, tensors: dict) -> None:
        """One optimizer step on the gradients `_backward` left, unless the loss or the
        gradient is not finite: then the step is skipped and counted. Adds its metrics to
        `tensors`."""
        if self.cfg.learner.ess_lr != "off":
            scale = self._ess_scale(d, logprobs)
            tensors["learner/ess_lr_scale"] = torch.tensor(scale, dtype=torch.float64)
            lr = lr * scale
        for group in self.opt.param_groups:
            group["lr"] = lr
        tensors["learner/lr"] = torch.tensor(lr, dtype=torch.float64)
        clip = self.cfg.learner.grad_clip if self.cfg.learner.grad_clip > 0 else float("inf")
        grad_norm = self.parallel.clip_grad_norm(self.model, clip)
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):  # one host sync
            self.opt.step()
        else:  # a NaN/inf would poison the weights
            self.opt.zero_grad(set_to_none=True)
            self.nonfinite_skipped += 1
        tensors["learner/grad_norm"] = grad_norm

    def _advantages(self, batch: Batch, d: PaddedBatch) -> torch.Tensor:
        """(B,) each row's advantage: the buffer's when it computed them (batches sized in
        rows), else over the batch's episodes with the loss's own estimator when it has one
        (given each episode's summed log(pi_prox / mu), 0 without a proximal pass) or
        `learner.advantage`; times prioritized replay's importance weights."""
        adv = batch.given_advantages()
        if adv is None:
            rows, rewards, groups = batch.episodes()
            if self.loss.advantage is None:
                adv = episode_advantages(self.advantage_fn, rows, rewards, groups)
            else:
                mask, prox = d.loss_mask, d.proximal_logprobs
                log_w = (np.zeros(len(mask)) if prox is None else
                         ((prox - d.behavior_logprobs) * mask).sum(-1).double().numpy())
                adv = episode_advantages(self.advantage_fn, rows, rewards, groups, log_w,
                                         mask.sum(-1).double().numpy(),
                                         **self.advantage_params)
        adv = torch.from_numpy(adv)
        if batch.weights is not None:  # prioritized replay's importance weights, (B,)
            adv = adv * torch.from_numpy(batch.weights)
        return adv

    def _ess_scale(self, d: PaddedBatch, logprobs: torch.Tensor) -> float:
        """`learner.ess_lr`'s factor (schedule.py) for this batch's rows."""
        # without a proximal pass the step's own log-probs are the proximal ones
        prox = logprobs if d.proximal_logprobs is None else d.proximal_logprobs
        mask = d.loss_mask
        return ess_scale(self.cfg.learner,
                         ((prox - d.behavior_logprobs) * mask).sum(-1)[mask.sum(-1) > 0])

    @torch.no_grad()
    def _proximal(self, d: PaddedBatch) -> torch.Tensor:
        """(B, T) log-probs of the batch under the current weights (the proximal policy), each
        worker scoring its rows, `learner.micro_batch` at a time."""
        out = torch.zeros(d.targets.shape, device=self.device)
        for rows, c, start in self._chunks(d):
            out[rows] = self._score(self.model, c, start)
        return self.parallel.sum(out).cpu()

    def autocast(self) -> torch.autocast:
        """`learner.precision`'s autocast, a new one per use (an autocast object keeps its
        caller's previous state: one object entered on two threads would mix them up)."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def _score(self, model, c: PaddedBatch, start: int, **entropy):
        """(b, T) log-probs of a micro-batch's targets under `model` at the engine's
        temperature, each distinct prompt run once (`learner.share_prompts`)."""
        with self.autocast():
            return sequence_logprobs(lora.scoring_module(model), c, self.cfg.engine.temperature,
                                     start=start, share=self.cfg.learner.share_prompts, **entropy)

    def _reference_beside(self, c: PaddedBatch, start: int) -> Future | None:
        """The separate KL reference's (b, T) log-probs, started on the reference thread so
        they are computed while this thread runs the policy's forward; None without that
        thread (no separate reference, or `learner.reference_thread` off)."""
        if self.beside is None:
            return None

        def score():
            with torch.no_grad():
                return self._score(self.reference, c, start)
        return self.beside.submit(score)

    def _chunks(self, d: PaddedBatch):
        """This worker's rows in micro-batches (`Parallel.micro_batches`): yields (row indices,
        the rows on the device, the first target position they need)."""
        for rows in self.parallel.micro_batches(len(d), self.cfg.learner.micro_batch):
            yield (rows, d.rows(rows).map(lambda t: t.to(self.device)),
                   first_target(d.loss_mask[rows]))

    def _backward(self, d: PaddedBatch, adv: torch.Tensor):
        """Loss and gradients for the rows of `d`, `learner.micro_batch` rows at a time; with
        several workers each takes its share of the rows and the results are summed.

        Each chunk's loss is weighted by its share of the rows' loss tokens, so token-mean
        losses (most of them) get exactly the full-batch gradient; sequence-mean ones (gspo,
        seq_mask_is) are close when chunks hold similar token counts.
        Returns (loss, (B, T) detached log-probs on CPU, weighted loss metrics): 0-dim tensors.
        """
        total = d.loss_mask.sum().clamp(min=1)  # all the rows': every worker weights alike
        loss_sum, metrics, logprobs = torch.zeros((), device=self.device).double(), {}, []
        for rows, c, start in self._chunks(d):
            loss, m, lp = self._chunk_loss(c, adv[rows, None].to(self.device), start)
            w = c.loss_mask.sum() / total.to(self.device)
            (loss * w).backward()
            w64 = w.detach().double()  # the sums in float64, as the chunks' floats would be
            loss_sum = loss_sum + loss.detach().double() * w64
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v.double() * w64
            logprobs.append(lp)
        self.parallel.reduce_gradients(self.model)
        names = sorted(metrics)
        sums = self.parallel.sum(torch.stack([loss_sum] + [metrics[k] for k in names]))
        logprobs = self.parallel.gather_rows(len(d), torch.cat(logprobs).to(self.device))
        return sums[0], logprobs.cpu(), dict(zip(names, sums[1:]))

    def _chunk_loss(self, c: PaddedBatch, adv: torch.Tensor, start: int):
        """One micro-batch's regularized loss, its metrics and its detached (b, T) log-probs."""
        cfg = self.cfg
        beside = self._reference_beside(c, start)
        lp, entropy = self._score(self.model, c, start, entropy=True,
                                  entropy_grad=cfg.loss.entropy_coef != 0)          # (b, T) x2
        kl = None
        if beside is not None:
            kl = kl_penalty(lp, beside.result(), cfg.loss.kl_estimator)
        elif self.reference is not None or self.reference_is_base:
            with torch.no_grad(), lora.reference_off(self.model):
                ref = self._score(self.reference or self.model, c, start)
            kl = kl_penalty(lp, ref, cfg.loss.kl_estimator)
        # Without a proximal pass (one step per batch) the weights at the start of the step are
        # the current ones, so this forward's log-probs are the proximal ones.
        prox = lp.detach() if c.proximal_logprobs is None else c.proximal_logprobs
        inputs = LossInputs(logprobs=lp, behavior_logprobs=c.behavior_logprobs,
                            advantages=adv.expand_as(lp), mask=c.loss_mask,
                            proximal_logprobs=prox, row_weights=c.row_weights)
        loss, m = self.loss(inputs, **self.loss_params)
        loss, reg = regularized(loss, c.loss_mask, entropy, cfg.loss.entropy_coef, kl,
                                cfg.loss.kl_coef)
        return loss, {**m, **reg}, lp.detach()

    def _metrics(self, batch: Batch, d: PaddedBatch, logprobs: torch.Tensor,
                 tensors: dict[str, torch.Tensor], parity: dict, spans: Spans) -> dict:
        """The step's metrics, all in one place: tensors become numbers here, once."""
        self.samples += len(batch)
        mask = d.loss_mask                                                      # (B, T)
        self.tokens += int(mask.sum())
        staleness = (batch.version - d.versions[mask.bool()]).float()
        if not len(staleness):  # every token left out (masked as stale): nothing to describe
            staleness = torch.zeros(1)
        tensors.update(importance_diagnostics(logprobs, d.behavior_logprobs, mask))
        tensors.update(staleness_by_position(batch, d))
        tensors.update({"learner/tokens": mask.sum(), "rollout/completion_len":
                        mask.sum(1).float().mean(),
                        # policy turns per episode: runs of loss_mask 1 (env tokens between)
                        "rollout/turns": (mask[:, :1].sum() + (mask[:, 1:] > mask[:, :-1]).sum())
                        .double() / len(mask), "staleness/min": staleness.min(),
                        "staleness/mean": staleness.mean(), "staleness/max": staleness.max()})
        metrics = {"step": self.version, **to_numbers(tensors),
                   "learner/nonfinite_skipped": self.nonfinite_skipped,
                   **self.parallel.metrics(),
                   "learner/batch_size": len(batch),
                   "rollout/reward_mean": float(batch.episodes()[1].mean()),
                   "staleness/hist": {str(int(k)): int(n) for k, n in
                                      zip(*torch.unique(staleness, return_counts=True))},
                   **parity, **batch.stats, **spans.metrics(),
                   "memory/learner_peak_rss_mb": peak_rss_mb(),
                   "throughput/samples_per_s":
                   self.samples / (time.perf_counter() - self.started),
                   "throughput/tokens_per_s":
                   self.tokens / (time.perf_counter() - self.started)}
        metrics["learner/tokens"] = int(metrics["learner/tokens"])
        return metrics

    def publish_latest(self) -> int:
        """Publish the current weights unless they already are (the final eval measures them);
        returns the version. Every worker that `publishes` calls it."""
        if self.parallel.publishes and self.published_version != self.version:
            self.publish()
        return self.version

    def publish(self) -> None:
        """Send the weights for `self.version` to actors; then tell the buffer (admission).
        Every worker that `publishes` calls it (sharded: all, the weights are gathered); the
        leader sends them, and keeps them for the parity check."""
        self.published_version = self.version
        keep = self.parity is not None
        # in the engine's dtype (a bf16 engine: half the bytes to send)
        dtype = torch.bfloat16 if self.plan.engine_dtype == "bfloat16" else torch.float32
        state = self.parallel.full_state(self.model, keep=keep or self.weights.needs_cpu_state,
                                         dtype=dtype)
        if not self.parallel.leader:
            return
        self.weights.publish(state, self.version)
        self.buffer.publish(self.version)
        if keep:
            self.parity.keep(self.version, state)

    def save(self, path: str) -> None:
        """Write the current policy as a Hugging Face folder (loadable as `model.path`), from
        the leader. Every worker that `publishes` calls it (sharded: the weights are
        gathered)."""
        self.parallel.save_model(self.model, path)
        if self.parallel.leader:
            self.tokenizer.save_pretrained(path)

    def save_state(self, path: str) -> None:
        """A resumable checkpoint's learner part: the policy (`model/`) and `learner.pt`
        (optimizer, version, random state). The learner was built from `model/` on resume.
        Sharded, every worker writes its shard of the optimizer to `optimizer/`
        (torch.distributed.checkpoint) instead of `learner.pt`."""
        self.save(f"{path}/model")
        optimizer = self.parallel.save_optimizer(self.model, self.opt, f"{path}/optimizer")
        if not self.parallel.leader:
            return
        torch.save({"optimizer": optimizer, "workers": self.parallel.optimizer_shards,
                    "version": self.version, "nonfinite_skipped": self.nonfinite_skipped,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                    else None}, f"{path}/learner.pt")

    def load_state(self, path: str) -> int:
        """Continue from `save_state`'s checkpoint (the weights came with `model_path`):
        versions count on from the checkpoint's, and the weights are published under that
        version, so actors tag their tokens with it and the staleness bound holds at once."""
        state = torch.load(f"{path}/learner.pt", map_location=self.device, weights_only=False)
        self.parallel.load_optimizer(self.model, self.opt, state["optimizer"],
                                     f"{path}/optimizer")
        self.version = state["version"]
        self.nonfinite_skipped = state["nonfinite_skipped"]
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.parity is not None:  # the weights built in are this version's, not 0's
            self.parity.forget()
        if self.parallel.publishes:
            self.publish()
        return self.version
