"""How the learner's workers share an update: alone, data-parallel, or sharded (FSDP).

Reads: the torch.distributed group (set up by `workers.py` before the Learner is built).
Writes: a checkpoint's model folder and optimizer state, as the strategy dictates.

The Learner (learner.py) holds the algorithm; its `Parallel` strategy holds everything that
depends on how many workers there are: rank and world, each worker's share of the rows, the
batch broadcast, the sums over workers, the gather before publishing, and saving. Every
collective call of a learner step is made here.
- `Alone`: one process; every sum is the identity.
- `DataParallel`: N processes, each with the whole model. Rank 0 (the leader) samples,
  publishes and writes; each worker trains on rows rank::N and gradients, losses and log-probs
  are summed over the workers.
- `Sharded` (`learner.sharding: fsdp`, sharding.py): N processes (or a group of one), each
  holding 1/N of every parameter. FSDP reduces the gradients in the backward; gathering the
  weights to publish or save is a collective, so every worker takes part in both.
Each worker weights its rows' loss by their share of the whole batch's tokens, so the sum of
the workers' gradients is the full batch's gradient, whatever the strategy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from offpolicy.learner import lora, sharding
from offpolicy.weights.sync import cpu_state, to_bf16


class Alone:
    """One worker: rank 0 of 1."""

    publishes_together = False
    """Whether every worker takes part in publishing and saving (a collective gather)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world = 0, 1

    @property
    def leader(self) -> bool:
        """Rank 0: it samples the batch, keeps the parity check, publishes and writes."""
        return self.rank == 0

    @property
    def publishes(self) -> bool:
        """Whether this worker calls the Learner's `publish` (and `save`)."""
        return self.leader or self.publishes_together

    @property
    def optimizer_shards(self) -> int:
        """How many files the optimizer state is saved as (1: in `learner.pt`)."""
        return 1

    def place(self, model: torch.nn.Module) -> None:
        """Put the policy where it trains (before the optimizer is built)."""
        model.to(self.device)

    # -- the step -------------------------------------------------------------------------------

    def share(self, batch):
        """The leader's batch, on every worker."""
        return batch

    def my_rows(self, B: int) -> torch.Tensor:
        """This worker's rows of a batch of B: rank, rank + world, ..."""
        if B < self.world:
            raise ValueError(f"learner: a batch of {B} rows cannot feed {self.world} workers")
        return torch.arange(self.rank, B, self.world)

    def micro_batches(self, B: int, micro_batch: int) -> list[torch.Tensor]:
        """This worker's rows in chunks of at most `micro_batch` (0: one chunk). Every worker
        makes the same number of chunks (that of the worker with the most rows), since each
        sharded forward and backward is a collective of all workers."""
        mine, most = self.my_rows(B), -(-B // self.world)
        chunks = mine.tensor_split(-(-most // (micro_batch or most)))
        if any(not len(rows) for rows in chunks):
            raise ValueError(f"learner: worker {self.rank} has {len(mine)} rows for "
                             f"{len(chunks)} micro-batches; raise learner.micro_batch")
        return list(chunks)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the workers, on every worker."""
        return t

    def gather_rows(self, B: int, values: torch.Tensor) -> torch.Tensor:
        """(B, ...) from each worker's `my_rows` of it (`values`), on every worker."""
        return values

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Sum the gradients over the workers."""

    def clip_grad_norm(self, model: torch.nn.Module, clip: float) -> torch.Tensor:
        """Clip the global gradient norm to `clip`; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

    # -- publishing and saving ------------------------------------------------------------------

    def full_state(self, model: torch.nn.Module, keep: bool,
                   dtype: torch.dtype = torch.float32) -> dict | None:
        """The whole weights as CPU tensors on the leader when `keep` (a publish needs them),
        else None; cast to `dtype` in the copy. Called by every worker that `publishes`."""
        if not (keep and self.leader):
            return None
        return lora.merged_state(model, dtype) if lora.is_lora(model) else cpu_state(model, dtype)

    def save_model(self, model: torch.nn.Module, path: str) -> None:
        """The policy as a Hugging Face folder, written by the leader (LoRA: merged, with the
        adapter in `adapter/`)."""
        if self.leader:
            lora.save(model, path) if lora.is_lora(model) else model.save_pretrained(path)

    def save_optimizer(self, model, opt: torch.optim.Optimizer, folder: str) -> dict | None:
        """The optimizer state for the leader's `learner.pt` (None: written to `folder`)."""
        return opt.state_dict()

    def load_optimizer(self, model, opt: torch.optim.Optimizer, saved: dict | None,
                       folder: str) -> None:
        """Continue from `save_optimizer`'s state: `saved` from learner.pt, or, when None, the
        sharded files in `folder` (written by any number of workers)."""
        if saved is None:
            sharding.load_optimizer(model, opt, folder)
        else:
            opt.load_state_dict(saved)

    def metrics(self) -> dict:
        return {}


class DataParallel(Alone):
    """N workers in a torch.distributed group, each with the whole model."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def share(self, batch):
        box = [batch]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)  # on the training device: NCCL reduces only CUDA tensors
        return t

    def gather_rows(self, B: int, values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(B, *values.shape[1:], device=self.device, dtype=values.dtype)
        full[self.my_rows(B).to(self.device)] = values.to(self.device)
        return self.sum(full)

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)


class Sharded(DataParallel):
    """`learner.sharding: fsdp`: every worker holds 1/N of the parameters, gradients and AdamW
    state (a group of one when there is no other worker)."""

    publishes_together = True

    def __init__(self, device: torch.device, lc) -> None:
        sharding.ensure_group(device)
        super().__init__(device)
        self.lc = lc
        self.gather_peak_bytes = 0  # the largest tensor a publish gathered

    @property
    def optimizer_shards(self) -> int:
        return self.world

    def place(self, model: torch.nn.Module) -> None:
        sharding.shard(model, self.device, self.lc)  # one block at a time onto the device

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """FSDP reduce-scattered them in the backward."""

    def clip_grad_norm(self, model: torch.nn.Module, clip: float) -> torch.Tensor:
        return super().clip_grad_norm(model, clip).full_tensor()  # a DTensor, alike everywhere

    def full_state(self, model: torch.nn.Module, keep: bool,
                   dtype: torch.dtype = torch.float32) -> dict | None:
        state, peak = sharding.full_state(model, keep=self.leader)  # in the shards' float32
        self.gather_peak_bytes = max(self.gather_peak_bytes, peak)
        return to_bf16(state) if state is not None and dtype == torch.bfloat16 else state

    def save_model(self, model: torch.nn.Module, path: str) -> None:
        sharding.save_whole(model, path, write=self.leader)

    def save_optimizer(self, model, opt: torch.optim.Optimizer, folder: str) -> None:
        sharding.save_optimizer(model, opt, folder)  # each worker its shard

    def load_optimizer(self, model, opt: torch.optim.Optimizer, saved: dict | None,
                       folder: str) -> None:
        if saved is not None:
            raise ValueError(f"{folder}: written without learner.sharding; resume it so")
        sharding.load_optimizer(model, opt, folder)

    def metrics(self) -> dict:
        return {"memory/fsdp_gather_peak_mb": self.gather_peak_bytes / 2 ** 20}


def reference_thread(lc, device: torch.device, autocast) -> ThreadPoolExecutor | None:
    """The thread that scores a separate KL reference beside the policy's forward
    (`learner.reference_thread`; CPU only, where a run's other core is the actor's, idle
    between its engine calls), or None. `autocast`: the learner's autocast factory.

    It enters autocast once for its whole life and never leaves it. autocast's cache of cast
    weights is process-wide and is emptied whenever a thread leaves its outermost autocast: a
    reference pass ending midway through the policy's forward would split the policy's
    weight casts in two, and their gradients would then be summed per cast in float32 rather
    than once in bf16 (the same values to rounding, not bit for bit)."""
    if not lc.reference_thread or device.type != "cpu":
        return None
    return ThreadPoolExecutor(1, thread_name_prefix="reference", initializer=autocast().__enter__)


def make_parallel(lc, device: torch.device) -> Alone:
    """The strategy `learner.sharding` and the process group (if any) call for."""
    if lc.sharding == "fsdp":
        return Sharded(device, lc)
    if dist.is_available() and dist.is_initialized():
        return DataParallel(device)
    return Alone(device)
