"""Data-parallel learner workers: one process each, holding a Learner in a torch.distributed group.

Reads: the rendezvous address rank 0 offers. Writes: what the Learner writes (rank 0 only).

`offpolicy/runtime/ray_roles.py` starts `resources.learner_workers` of these as Ray actors, asks
rank 0 for an address, and has every worker `join` the group (gloo on CPU, NCCL on GPU) before
the Learner is built, so each Learner sees its rank. From then on one update is a `step` call
on every worker at once: the step has collective sync points (the batch broadcast, the gradient
all-reduce), so a worker left out would block the others. The layout calls publishing and
saving on every worker too: data-parallel, rank 0 alone does them and the others return at
once; sharded (FSDP), gathering the weights is a collective of all workers
(`Parallel.publishes`).
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

from offpolicy.config.plan import RunPlan
from offpolicy.config.schema import Config
from offpolicy.learner.learner import Learner


class LearnerWorker:
    def __init__(self, cfg: Config, model_path: str, buffer, weights,
                 plan: RunPlan | None = None):
        self.args, self.plan = (cfg, model_path, buffer, weights), plan
        self.learner: Learner | None = None
        self.rank = None

    def address(self, host: str = "127.0.0.1") -> str:
        """HOST:PORT of a free port on this node, for the group's TCP rendezvous (rank 0);
        `host` is this node's address as the other workers reach it (the launcher knows it)."""
        with socket.socket() as s:  # the port is free now; the TCP store binds it next
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{host}:{port}"

    def join(self, address: str, rank: int, world: int, timeout_s: float = 600.0) -> int:
        """Join the process group (blocks until all `world` workers have), then build the
        Learner. A worker that never arrives, or dies mid-step, makes the others fail after
        `timeout_s` instead of waiting forever."""
        cfg = self.args[0]
        backend = "nccl" if cfg.resources.learner_gpus > 0 and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = rank
        self.learner = Learner(*self.args, plan=self.plan)
        return rank

    def step(self) -> dict | None:
        """One data-parallel update; rank 0 returns the step's metrics, the others None."""
        metrics = self.learner.step()
        return metrics if self.rank == 0 else None

    def publish_latest(self) -> int:
        return self.learner.publish_latest()

    def save(self, path: str) -> None:
        self.learner.save(path)

    def save_state(self, path: str) -> None:
        self.learner.save_state(path)

    def load_state(self, path: str) -> int:
        return self.learner.load_state(path)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
