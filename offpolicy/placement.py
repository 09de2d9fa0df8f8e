"""CPU placement of a run's processes on one machine (`resources.pin_cpus`, `actor_nice`).

Reads: `resources.pin_cpus`, `resources.actor_nice`, `resources.learner_cpus`.
Writes: nothing (sets CPU affinity and thread priorities).

With `pin_cpus` on Linux, the learner gets the first ceil(learner_cpus) cores and shares them
only with the processes it waits on anyway (the buffer, the weight store, the driver); the
rollout actors share the remaining cores. Generation then never takes the learner's core: the
CPU counterpart of a learner on its own GPU. With `actor_nice` the actors instead run at low
priority on any core, so they also use the learner's core while it waits for data. Without
either the OS scheduler places everything. Ray starts its workers at niceness 15, so a run
that starts its own Ray with `actor_nice` starts the workers at 0 (`launch.start_ray`).
"""

from __future__ import annotations

import math
import os
import sys


def core_split(learner_cpus: float) -> tuple[set[int], set[int]] | None:
    """(learner cores, actor cores), or None when this machine has too few cores to split."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    n = max(1, math.ceil(learner_cpus))
    if len(cores) <= n:
        return None
    return set(cores[:n]), set(cores[n:])


def _set_affinity(_instance, cores: set[int]) -> int:
    os.sched_setaffinity(0, cores)
    return os.getpid()


def _renice(_instance, niceness: int) -> int:
    """Lower the priority of every thread of this process (Linux niceness is per thread)."""
    for tid in os.listdir("/proc/self/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
    return os.getpid()


def _niceness(_instance) -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def pin_roles(cfg, roles: dict, ray) -> dict | None:
    """Pin the Ray roles of `start_roles` (and this driver process) and renice the actors;
    returns the core split used, if any."""
    nice = cfg.resources.actor_nice
    if nice and hasattr(os, "setpriority"):
        learner_nice = ray.get(roles["learner"].__ray_call__.remote(_niceness))
        if learner_nice >= nice:  # e.g. a cluster whose raylet starts workers at 15
            print(f"warning: resources.actor_nice {nice} does not lower the actors below the "
                  f"learner (niceness {learner_nice}); start Ray with RAY_worker_niceness=0",
                  file=sys.stderr)
        ray.get([a.__ray_call__.remote(_renice, nice) for a in roles["actors"]])
    split = core_split(cfg.resources.learner_cpus) if cfg.resources.pin_cpus else None
    if split is None:
        return None
    learner_cores, actor_cores = split
    refs = [roles[name].__ray_call__.remote(_set_affinity, learner_cores)
            for name in ("learner", "buffer", "store") if roles.get(name) is not None]
    if not cfg.resources.actor_nice:  # reniced actors may use any core: they yield anyway
        refs += [a.__ray_call__.remote(_set_affinity, actor_cores) for a in roles["actors"]]
    ray.get(refs)
    os.sched_setaffinity(0, learner_cores)
    return {"learner": sorted(learner_cores), "actors": sorted(actor_cores)}
