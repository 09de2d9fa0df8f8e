"""The learner: sample a batch, correct for staleness, take an optimizer step, publish weights.

Reads: Batches from the buffer (blocking `sample(version)`).
Writes: weights (WeightSync) every `sync_every` steps, the published version to the buffer,
and a metrics dict per step (returned to the driver, which writes metrics.jsonl).

A plain class: `offpolicy/ray_roles.py` wraps it as a Ray actor; tests call `step()` directly.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from offpolicy.advantages import ADVANTAGES
from offpolicy.config import Config, max_staleness
from offpolicy.losses import (LOSSES, NEEDS_PROXIMAL, OWN_ADVANTAGE, LossInputs,
                              importance_diagnostics, kl_penalty, regularized,
                              split_loss_params)
from offpolicy.metrics import peak_rss_mb
from offpolicy.models import first_target, load_policy
from offpolicy.types import Batch
from offpolicy.weights import cpu_state

from offpolicy.learner import sharding
from offpolicy.learner.shared_prompt import sequence_logprobs
from offpolicy.learner.step_metrics import Spans, to_numbers


def lr_at(lc, version: int) -> float:
    """The learning rate of the update that takes the policy from `version` to `version + 1`
    under `learner.lr_schedule` (warm-up, then constant or decaying to lr * min_lr_ratio)."""
    if version < lc.warmup_steps:
        return lc.lr * (version + 1) / lc.warmup_steps
    if lc.lr_schedule == "constant":
        return lc.lr
    span = max(lc.steps - lc.warmup_steps, 1)
    done = min((version - lc.warmup_steps) / span, 1.0)
    shape = 1 - done if lc.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done))
    return lc.lr * (lc.min_lr_ratio + (1 - lc.min_lr_ratio) * shape)


class Learner:
    def __init__(self, cfg: Config, model_path: str, buffer, weights):
        torch.set_num_threads(cfg.resources.learner_threads or cfg.resources.torch_threads)
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.buffer, self.weights = cfg, buffer, weights
        self.model, self.tokenizer = load_policy(model_path)
        # A GPU when Ray gave this role one (resources.learner_gpus), else the CPU.
        self.device = torch.device("cuda" if cfg.resources.learner_gpus > 0
                                   and torch.cuda.is_available() else "cpu")
        lc = cfg.learner
        # learner.sharding=fsdp (learner/sharding.py): sharding moves one block at a time to
        # the device, so the whole model is never there at once
        self.sharded = lc.sharding == "fsdp"
        self.model.to("cpu" if self.sharded else self.device).train()
        self.loss_fn, self.advantage_fn = LOSSES[cfg.loss.name], ADVANTAGES[lc.advantage]
        # the loss's own parameters, and its own advantage estimator's (oapl, asymre, vcpo)
        self.loss_params, self.advantage_params = split_loss_params(cfg.loss.name,
                                                                    cfg.loss.params)
        self.needs_proximal = lc.minibatches > 1 or cfg.loss.name in NEEDS_PROXIMAL
        # The frozen reference of the KL penalty, loaded only when the penalty is on.
        self.reference = None
        if cfg.loss.kl_coef > 0:
            self.reference = load_policy(cfg.loss.kl_reference or model_path)[0]
            self.reference.to(self.device).eval().requires_grad_(False)
        self.version = 0  # optimizer steps taken; the base model is version 0
        self.published_version = 0  # actors start with the base model
        # Data-parallel workers (torch.distributed already initialised by the launcher): rank 0
        # samples and publishes; every rank trains on its share of the same batch.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world = torch.distributed.get_world_size() if distributed else 1
        self.samples = 0
        self.nonfinite_skipped = 0  # steps skipped for a NaN/inf loss or gradient
        self.started = time.perf_counter()
        # Published weights by version, for the engine/learner log-prob parity check: tokens
        # are re-scored with the exact weights that generated them (a shadow model).
        if self.rank == 0:  # NCCLSync meets the actors' engines here; the others need nothing
            weights.connect(self.model)
        self.history: dict[int, dict[str, torch.Tensor]] = {}
        self.shadow = None
        if cfg.engine.logprob_check_every and self.rank == 0:
            self.history[0] = cpu_state(self.model)
            self.shadow = copy.deepcopy(self.model).to(self.device).eval()
        if cfg.staleness.mode == "lag" and self.rank == 0:  # actors may ask for version 0 later
            self.weights.publish(cpu_state(self.model), 0)
        # Sharded, from here on every worker holds 1/N of the weights, and gathering them to
        # publish or save is a collective of all workers.
        self.gather_peak_bytes = 0  # the largest tensor a publish gathered (sharded)
        if self.sharded:
            sharding.shard(self.model, self.device, lc)
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lc.lr, betas=tuple(lc.betas),
                                     weight_decay=lc.weight_decay)

    def step(self) -> dict:
        """One version: a sampled batch, `learner.minibatches` optimizer steps on it, and a
        publish when due. Blocks in the buffer until a batch for this version is ready."""
        spans = Spans()
        with spans("wait"):
            batch = self._next_batch()
        with spans("prepare"):
            d = {k: torch.from_numpy(v)
                 for k, v in batch.padded(self.tokenizer.pad_token_id).items()}   # (B, T) each
        parity = {}
        if self._parity_due():
            with spans("parity"):
                parity = self._logprob_parity(d)
        with spans("backward"):  # forward, backward and optimizer steps
            loss, logprobs, tensors = self._update(d, batch)
        if self.version % self.cfg.learner.sync_every == 0 and (self.rank == 0 or self.sharded):
            with spans("publish"):
                self.publish()
        return self._metrics(batch, d, logprobs, {**tensors, "learner/loss": loss}, parity,
                             spans)

    def _parity_due(self) -> bool:
        every = self.cfg.engine.logprob_check_every
        return bool(every) and self.rank == 0 and self.version % every == 0

    def _update(self, d: dict[str, torch.Tensor], batch: Batch):
        """`learner.minibatches` optimizer steps on disjoint shares of the batch's rows (a
        fixed shuffle per version), then the version advances by one: a version is one
        sampled batch however many steps it took, so staleness and lag mode count batches.
        The proximal policy (the weights at the start of the batch) is scored once, before
        the first step, when a step needs it. Returns (loss, (B, T) log-probs, metric tensors),
        the loss and metrics averaged over the steps."""
        prox = self._proximal(d) if self.needs_proximal else None                 # (B, T)
        adv = self._advantages(batch, d, prox)                                     # (B,)
        lr, n = lr_at(self.cfg.learner, self.version), self.cfg.learner.minibatches
        order = torch.arange(len(adv))
        if n > 1:
            seed = self.cfg.run.seed * 1_000_003 + self.version
            order = torch.randperm(len(adv), generator=torch.Generator().manual_seed(seed))
        logprobs, loss, tensors = torch.zeros(d["targets"].shape), 0.0, {}
        for rows in order.tensor_split(n):
            sub = {k: v[rows] for k, v in d.items()}
            if prox is not None:
                sub["proximal_logprobs"] = prox[rows]
            part_loss, logprobs[rows], part = self._optimizer_step(sub, adv[rows], lr)
            loss = loss + part_loss / n
            for k, v in part.items():
                tensors[k] = tensors.get(k, 0.0) + v.double() / n
        self.version += 1
        return loss, logprobs, tensors

    def _optimizer_step(self, d: dict[str, torch.Tensor], adv: torch.Tensor, lr: float):
        """Gradients for these rows and one optimizer step, unless the loss or the gradient is
        not finite: then the step is skipped and counted."""
        self.opt.zero_grad(set_to_none=True)
        loss, logprobs, tensors = self._backward(d, adv)
        if self.cfg.learner.ess_lr != "off":
            scale = self._ess_scale(d, logprobs)
            tensors["learner/ess_lr_scale"] = torch.tensor(scale, dtype=torch.float64)
            lr = lr * scale
        for group in self.opt.param_groups:
            group["lr"] = lr
        tensors["learner/lr"] = torch.tensor(lr, dtype=torch.float64)
        clip = self.cfg.learner.grad_clip if self.cfg.learner.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # sharded: a DTensor, the same on every worker
            grad_norm = grad_norm.full_tensor()
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):  # one host sync
            self.opt.step()
        else:  # a NaN/inf would poison the weights
            self.opt.zero_grad(set_to_none=True)
            self.nonfinite_skipped += 1
        tensors["learner/grad_norm"] = grad_norm
        return loss, logprobs, tensors

    def _advantages(self, batch: Batch, d: dict[str, torch.Tensor],
                    prox: torch.Tensor | None) -> torch.Tensor:
        """(B,) advantages: the loss's own estimator when it has one (given each row's summed
        log(pi_prox / mu), 0 without a proximal pass), else `learner.advantage`; times
        prioritized replay's importance weights."""
        rewards, groups = batch.rewards(), batch.group_index()
        own = OWN_ADVANTAGE.get(self.cfg.loss.name)
        if own is None:
            adv = self.advantage_fn(rewards, groups)
        else:
            mask = d["loss_mask"]
            log_w = (np.zeros(len(mask)) if prox is None else
                     ((prox - d["behavior_logprobs"]) * mask).sum(-1).double().numpy())
            adv = own(rewards, groups, log_w, mask.sum(-1).numpy(), **self.advantage_params)
        adv = torch.from_numpy(adv)
        if batch.weights is not None:  # prioritized replay's importance weights, (B,)
            adv = adv * torch.from_numpy(batch.weights)
        return adv

    def _ess_scale(self, d: dict[str, torch.Tensor], logprobs: torch.Tensor) -> float:
        """`learner.ess_lr`: the learning rate's factor from the effective sample size of the
        rows' sequence weights w = pi_prox / mu, ESS / n = (sum w)^2 / (n sum w^2):
        min(1, ESS / n / ess_lr_base), square-rooted for `sqrt` (VCPO, arXiv 2602.17616)."""
        prox = d.get("proximal_logprobs", logprobs)  # without a proximal pass: this step's own
        mask = d["loss_mask"]
        log_w = (((prox - d["behavior_logprobs"]) * mask).sum(-1)[mask.sum(-1) > 0]).double()
        if not len(log_w):
            return 1.0
        frac = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
        rho = min(1.0, float(frac) / len(log_w) / self.cfg.learner.ess_lr_base)
        return math.sqrt(rho) if self.cfg.learner.ess_lr == "sqrt" else rho

    @torch.no_grad()
    def _proximal(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) log-probs of the batch under the current weights (the proximal policy), each
        worker scoring its rows, `learner.micro_batch` at a time."""
        out = torch.zeros(d["targets"].shape, device=self.device)
        for rows, c, start in self._chunks(d):
            out[rows] = self._score(self.model, c, start)
        if self.world > 1:
            torch.distributed.all_reduce(out)
        return out.cpu()

    def _score(self, model, c: dict[str, torch.Tensor], start: int, **entropy):
        """(b, T) log-probs of a micro-batch's targets under `model` at the engine's
        temperature, each distinct prompt run once (`learner.share_prompts`)."""
        return sequence_logprobs(model, c, self.cfg.engine.temperature, start=start,
                                 share=self.cfg.learner.share_prompts, **entropy)

    def _chunks(self, d: dict[str, torch.Tensor]):
        """This worker's rows (rank::world) in chunks of at most `learner.micro_batch` rows:
        yields (row indices, the rows' tensors on the device, the first target position they
        need). Every worker makes the same number of chunks (that of the worker with the most
        rows), since each sharded forward and backward is a collective of all workers."""
        B = len(d["input_ids"])
        if B < self.world:
            raise ValueError(f"learner: a batch of {B} rows cannot feed {self.world} workers")
        mine = torch.arange(self.rank, B, self.world)  # this worker's rows (all of them alone)
        most = -(-B // self.world)
        n = -(-most // (self.cfg.learner.micro_batch or most))
        for rows in mine.tensor_split(n):
            if not len(rows):
                raise ValueError(f"learner: worker {self.rank} has {len(mine)} rows for {n} "
                                 "micro-batches; raise learner.micro_batch")
            yield (rows, {k: v[rows].to(self.device) for k, v in d.items()},
                   first_target(d["loss_mask"][rows]))

    def _metrics(self, batch: Batch, d: dict[str, torch.Tensor], logprobs: torch.Tensor,
                 tensors: dict[str, torch.Tensor], parity: dict, spans: Spans) -> dict:
        """The step's metrics, all in one place: tensors become numbers here, once."""
        self.samples += len(batch)
        mask = d["loss_mask"]                                                   # (B, T)
        staleness = (batch.version - d["versions"][mask.bool()]).float()
        tensors.update(importance_diagnostics(logprobs, d["behavior_logprobs"], mask))
        tensors.update({"learner/tokens": mask.sum(), "rollout/completion_len":
                        mask.sum(1).float().mean(),
                        # policy turns per episode: runs of loss_mask 1 (env tokens between)
                        "rollout/turns": (mask[:, :1].sum() + (mask[:, 1:] > mask[:, :-1]).sum())
                        .double() / len(mask), "staleness/min": staleness.min(),
                        "staleness/mean": staleness.mean(), "staleness/max": staleness.max()})
        metrics = {"step": self.version, **to_numbers(tensors),
                   "learner/nonfinite_skipped": self.nonfinite_skipped,
                   **({"memory/fsdp_gather_peak_mb": self.gather_peak_bytes / 2 ** 20}
                      if self.sharded else {}),
                   "learner/batch_size": len(batch),
                   "rollout/reward_mean": float(batch.rewards().mean()),
                   "staleness/hist": {str(int(k)): int(n) for k, n in
                                      zip(*torch.unique(staleness, return_counts=True))},
                   **parity, **batch.stats, **spans.metrics(),
                   "memory/learner_peak_rss_mb": peak_rss_mb(),
                   "throughput/samples_per_s":
                   self.samples / (time.perf_counter() - self.started)}
        metrics["learner/tokens"] = int(metrics["learner/tokens"])
        return metrics

    def _backward(self, d: dict[str, torch.Tensor], adv: torch.Tensor):
        """Loss and gradients for the batch, `learner.micro_batch` rows at a time; with
        data-parallel workers each takes rows rank::world and `_all_reduce` sums the results.

        Each chunk's loss is weighted by its share of the batch's loss tokens, so token-mean
        losses (most of them) get exactly the full-batch gradient; sequence-mean ones (gspo,
        seq_mask_is) are close when chunks hold similar token counts.
        Returns (loss, (B, T) detached log-probs on CPU, weighted loss metrics): 0-dim tensors.
        """
        B, cfg = len(d["input_ids"]), self.cfg
        total = d["loss_mask"].sum().clamp(min=1)  # the whole batch's: ranks weight alike
        loss_sum, metrics, logprobs = torch.zeros((), device=self.device).double(), {}, []
        for rows, c, start in self._chunks(d):
            lp, entropy = self._score(self.model, c, start, entropy=True,
                                      entropy_grad=cfg.loss.entropy_coef != 0)  # (b, T) x2
            kl = None
            if self.reference is not None:
                with torch.no_grad():
                    ref = self._score(self.reference, c, start)
                kl = kl_penalty(lp, ref, cfg.loss.kl_estimator)
            # Without a proximal pass (one step per batch) the weights at the start of the step
            # are the current ones, so this forward's log-probs are the proximal ones.
            prox = c["proximal_logprobs"] if "proximal_logprobs" in c else lp.detach()
            inputs = LossInputs(logprobs=lp, behavior_logprobs=c["behavior_logprobs"],
                                advantages=adv[rows, None].to(self.device).expand_as(lp),
                                mask=c["loss_mask"], proximal_logprobs=prox)
            loss, m = self.loss_fn(inputs, **self.loss_params)
            loss, reg = regularized(loss, c["loss_mask"], entropy, cfg.loss.entropy_coef,
                                    kl, cfg.loss.kl_coef)
            w = c["loss_mask"].sum() / total.to(self.device)
            (loss * w).backward()
            w64 = w.detach().double()  # the sums in float64, as the chunks' floats would be
            loss_sum = loss_sum + loss.detach().double() * w64
            for k, v in {**m, **reg}.items():
                metrics[k] = metrics.get(k, 0.0) + v.double() * w64
            logprobs.append(lp.detach().cpu())
        logprobs = torch.cat(logprobs)
        if self.world > 1:
            mine = torch.arange(self.rank, B, self.world)  # the rows `_chunks` gave this worker
            loss_sum, metrics, logprobs = self._all_reduce(B, mine, loss_sum, metrics, logprobs)
        return loss_sum, logprobs, metrics

    def _all_reduce(self, B: int, mine: torch.Tensor, loss_sum: torch.Tensor, metrics: dict,
                    logprobs: torch.Tensor):
        """Sync point of data-parallel workers: sum gradients (each rank's are already weighted
        by its share of the batch's tokens, so the sum is the full-batch gradient), the loss and
        metrics, and assemble the (B, T) log-probs from every rank's rows."""
        dist = torch.distributed
        for p in self.model.parameters() if not self.sharded else ():  # FSDP reduced them
            if p.grad is not None:
                dist.all_reduce(p.grad)
        names = sorted(metrics)
        # on the training device: NCCL reduces only CUDA tensors
        sums = torch.stack([loss_sum] + [metrics[k] for k in names]).to(torch.float64)
        dist.all_reduce(sums)
        full = torch.zeros(B, logprobs.shape[1], device=self.device)            # (B, T)
        full[mine.to(self.device)] = logprobs.to(self.device)
        dist.all_reduce(full)
        return sums[0], dict(zip(names, sums[1:])), full.cpu()

    def _next_batch(self) -> Batch:
        """Rank 0 waits for this version's batch; data-parallel workers get it from rank 0
        (a sync point)."""
        batch = None
        while self.rank == 0 and batch is None:
            batch = self.buffer.sample(self.version)
            if batch is None and self.buffer.is_closed():
                raise RuntimeError("buffer closed while the learner waited for data")
        if self.world > 1:
            box = [batch]
            torch.distributed.broadcast_object_list(box, src=0)
            batch = box[0]
        return batch

    @torch.no_grad()
    def _logprob_parity(self, d: dict[str, torch.Tensor], rows: int = 8) -> dict:
        """Mean |engine log-prob - learner log-prob| over tokens of up to `rows` batch rows
        generated by one version, re-scored with that version's weights.

        One version per step (rotating over those in the batch) keeps the cost at one weight
        load and one small forward however far the batch's versions spread. After an in-flight
        update the engine's cached keys/values of a row's earlier tokens come from the old
        weights, so only a row's tokens before its first version change are exactly
        reproducible; later ones are left out of the check.
        """
        mask, versions = d["loss_mask"].bool(), d["versions"]                    # (B, T)
        first = versions.gather(1, mask.float().argmax(1, keepdim=True)).squeeze(1)  # (B,)
        known = [v for v in first.tolist() if v in self.history]
        if not known:
            return {}
        v = known[self.version % len(known)]
        sel = torch.nonzero(first == v).squeeze(1)[:rows]
        self.shadow.load_state_dict(self.history[v])
        lp = self._score(self.shadow, {k: t[sel].to(self.device) for k, t in d.items()},
                         first_target(d["loss_mask"][sel])).cpu()
        keep = mask[sel] & (versions[sel] == v)
        diffs = (lp - d["behavior_logprobs"][sel])[keep].abs()
        if not len(diffs):
            return {}
        return {"engine/logprob_abs_diff": diffs.mean().item(),
                "engine/logprob_max_abs_diff": diffs.max().item(),
                "engine/logprob_checked_tokens": len(diffs)}

    def publish_latest(self) -> int:
        """Publish the current weights unless they already are (the final eval measures them);
        returns the version. Sharded, every worker calls it."""
        if (self.rank == 0 or self.sharded) and self.published_version != self.version:
            self.publish()
        return self.version

    def publish(self) -> None:
        """Send the weights for `self.version` to actors; then tell the buffer (admission).
        Sharded, every worker calls it: the full weights are gathered, kept by rank 0 alone."""
        self.published_version = self.version
        keep = self.shadow is not None
        state = None
        if self.sharded:
            state, peak = sharding.full_state(self.model, keep=self.rank == 0)
            self.gather_peak_bytes = max(self.gather_peak_bytes, peak)
            if self.rank != 0:
                return
        elif keep or self.weights.needs_cpu_state:
            state = cpu_state(self.model)
        self.weights.publish(state, self.version)
        self.buffer.publish(self.version)
        if keep:
            self.history[self.version] = state
            oldest = self.version - max_staleness(self.cfg) - self.cfg.learner.sync_every
            for v in [v for v in self.history if v < oldest]:
                del self.history[v]

    def save(self, path: str) -> None:
        """Write the current policy as a Hugging Face folder (loadable as `model.path`), from
        rank 0. Sharded, every worker calls it (the weights are gathered)."""
        if self.sharded:
            sharding.save_whole(self.model, path, write=self.rank == 0)
        elif self.rank == 0:
            self.model.save_pretrained(path)
        if self.rank == 0:
            self.tokenizer.save_pretrained(path)

    def save_state(self, path: str) -> None:
        """A resumable checkpoint's learner part: the policy (`model/`) and `learner.pt`
        (optimizer, version, random state). The learner was built from `model/` on resume.
        Sharded, every worker calls it and writes its shard of the optimizer to `optimizer/`
        (torch.distributed.checkpoint) instead of `learner.pt`."""
        self.save(f"{path}/model")
        if self.sharded:
            sharding.save_optimizer(self.model, self.opt, f"{path}/optimizer")
        if self.rank != 0:
            return
        torch.save({"optimizer": None if self.sharded else self.opt.state_dict(),
                    "workers": self.world if self.sharded else 1, "version": self.version,
                    "nonfinite_skipped": self.nonfinite_skipped,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                    else None}, f"{path}/learner.pt")

    def load_state(self, path: str) -> int:
        """Continue from `save_state`'s checkpoint (the weights came with `model_path`):
        versions count on from the checkpoint's, and rank 0 publishes the weights under that
        version, so actors tag their tokens with it and the staleness bound holds at once."""
        state = torch.load(f"{path}/learner.pt", map_location=self.device, weights_only=False)
        if state["optimizer"] is None:  # sharded: any number of workers, sharded or not
            sharding.load_optimizer(self.model, self.opt, f"{path}/optimizer")
        elif self.sharded:
            raise ValueError(f"{path} was written without learner.sharding; resume it so")
        else:
            self.opt.load_state_dict(state["optimizer"])
        self.version = state["version"]
        self.nonfinite_skipped = state["nonfinite_skipped"]
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.rank == 0 or self.sharded:
            self.history.clear()  # the weights built in are this version's, not version 0's
            self.publish()
        return self.version
