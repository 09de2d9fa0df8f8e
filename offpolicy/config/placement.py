"""The `resources` and `cluster` sections of the run configuration: what each role reserves
and which Ray cluster it runs on (`schema.py` holds the rest and the `Config` that nests these).

Reads: nothing. Writes: nothing. Each field's docstring is its documentation, as in schema.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ResourcesConfig:
    learner_cpus: float = 1.0
    """Ray CPUs reserved for the learner."""
    actor_cpus: float = 1.0
    """Ray CPUs reserved for each rollout actor."""
    torch_threads: int = 1
    """torch threads per role process (several processes share the machine's cores)."""
    learner_threads: int = 0
    """torch threads of each learner worker; 0 means `torch_threads`. On a small machine whose
    actors mostly wait (held off by the staleness bound), the learner may take every core."""
    num_cpus: int = 0
    """CPUs for a local Ray instance; 0 means all of this machine's."""
    learner_gpus: float = 0.0
    """Ray GPUs for the learner; > 0 trains on CUDA."""
    actor_gpus: float = 0.0
    """Ray GPUs for each rollout actor (vLLM runs on the GPU it is given)."""
    pin_cpus: bool = False
    """One machine, Linux: pin the learner (with the buffer, weight store and driver, which it
    waits on) to the first ceil(learner_cpus) cores and the rollout actors to the remaining
    ones, so generation never takes the learner's core (the CPU counterpart of a learner with
    its own GPU). With `actor_nice` set the actors stay free to use every core (at low
    priority). Ignored when there are too few cores."""
    keep_freed_memory: bool = True
    """Linux (glibc): a learner process on the CPU keeps the memory it frees for its next step
    instead of handing it back to the system (malloc: no block mmap'ed on its own, no trimming).
    A step's buffers are otherwise fresh pages every step: on SmolLM2 about 100K page faults
    a step (0.1-0.5 s of system time), against none, for 0.2 GB more memory."""
    actor_nice: int = 0
    """Linux niceness (0 to 19) of the rollout actor processes. Above 0 the learner, buffer and
    driver win every core they want, and actors use whatever CPU is left, on any core. A run
    that starts its own Ray then starts Ray's workers at niceness 0 (Ray's default is 15); on
    a cluster start Ray with RAY_worker_niceness=0."""
    learner_workers: int = 1
    """Data-parallel learner processes (torch.distributed: gloo on CPU, NCCL on GPU), each with
    learner_cpus/learner_gpus. Rank 0 samples every batch and publishes weights; each worker
    trains on its share of the rows and gradients are summed, so a step equals one worker's
    step on the same batch (the global batch stays learner.batch_groups groups)."""
    learner_resources: dict = field(default_factory=dict)
    """Custom Ray resources each learner worker needs (e.g. `{learner_node: 1}` for a node
    started with `ray start --resources '{"learner_node": 1}'`): how a config says where the
    learner runs."""
    actor_resources: dict = field(default_factory=dict)
    """Custom Ray resources each rollout actor needs (see learner_resources)."""
    serial: bool = False
    """Run the buffer, learner and actors in this one process, taking turns, without Ray (no
    inter-process calls, one model import). Generation and training then never overlap; in lag
    mode every update still gets exactly version t - k, so it is the same experiment as a Ray
    run (not bit for bit) at about half the CPU: what the staleness ablation uses. No Ray; the
    learner on a GPU with `learner_gpus` > 0, the HF engine on the CPU."""


@dataclass
class ClusterConfig:
    address: str = ""
    """Ray cluster to run on. Empty: $RAY_ADDRESS when set (inside `ray job submit`), else a
    private local Ray started for this run and stopped at its end. `auto`: the cluster this
    machine belongs to (e.g. on the head node after `ray up`). `HOST:PORT`: that cluster's GCS
    address."""
    placement: Literal["pack", "spread", "strict_pack", "strict_spread", "none"] = "pack"
    """Placement group for the learner workers and rollout actors, one bundle per process with
    its CPUs, GPUs and custom resources: `pack` fills as few nodes as possible, `spread` spreads
    the processes over nodes, `strict_*` insist; `none` lets Ray place each process alone. The
    buffer and weight store (no CPUs reserved) run on the driver's node."""
    placement_timeout_s: float = 0.0
    """Seconds to wait for the cluster to grant the placement group before the run stops with
    an error naming what it asked for; 0 = wait as long as it takes (while an autoscaler adds
    nodes, or an ablation's earlier cells finish), saying what it waits for every 30 s."""
    dashboard: bool = False
    """Start the Ray dashboard (and with it the job server) with a private local Ray."""
    dashboard_host: str = "127.0.0.1"
    """Interface the private local Ray's dashboard binds to. `0.0.0.0` exposes it, and job
    submission (which runs any code) with it, to the network."""
    dashboard_port: int = 8265
    """Port of the private local Ray's dashboard."""
