"""Where a run's processes go: which Ray, which nodes (placement groups), which cores.

Reads: the `cluster` and `resources` sections. Writes: nothing (starts or joins Ray, reserves
placement groups, sets CPU affinity and priorities).

`start_ray` joins the cluster at `cluster.address` (or $RAY_ADDRESS inside `ray job submit`)
or starts a private local Ray whose dashboard, if any, binds to 127.0.0.1. `reserve` asks for
one placement group holding a bundle per learner worker and rollout actor (its CPUs, GPUs and
custom resources) and waits until the cluster grants it, so the processes land where the config
says or the run says what it is waiting for. The buffer, weight store and eval desk reserve
no CPU and run on the driver's node.

With `pin_cpus` on one Linux machine, the learner gets the first ceil(learner_cpus) cores and
shares them only with the processes it waits on anyway (the buffer, the weight store, the
driver); the rollout actors share the remaining cores. Generation then never takes the
learner's core: the CPU counterpart of a learner on its own GPU. With `actor_nice` the actors
instead run at low priority on any core, so they also use the learner's core while it waits
for data. Without either the OS scheduler places everything. Ray starts its workers at
niceness 15, so a private Ray started with `actor_nice` starts them at 0 (`start_ray`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import time

from offpolicy.config.schema import Config
from offpolicy.core.errors import ConfigError
from offpolicy.core.process import process_env


# ---------------------------------------------------------------------------------------------
# Ray: join a cluster or start a private one


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled for this Ray cluster" line: a new private
    Ray turns token auth on by default (what we want) and says so at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def private_ray_auth() -> None:
    """Before a private `ray.init`: keep Ray's secure default without its notice line."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenAuthNotice) for f in logger.filters):
        logger.addFilter(_TokenAuthNotice())


_started_early = False  # `start_ray_early` started this process's private Ray


def start_ray_early(config: str | None, overrides: list[str]) -> bool:
    """Start the private local Ray that `offpolicy train CONFIG` will use, before the trainer's
    imports are done: the command line imports torch and transformers on a thread meanwhile,
    and Ray's processes boot on the other core (both done in 4.4 s against 6.7 s one after the
    other, 2 cores). Returns whether it started one. Only for a private Ray that the config
    asks for; on any problem (a config that does not parse, resources that do not fit) it
    starts nothing, or shuts down what it started, and the run's own checks report it."""
    global _started_early
    from offpolicy.config.io import parse_config

    try:
        cfg = parse_config(config, overrides)
    except ConfigError:
        return False
    if cfg.resources.serial or cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return False
    try:
        start_ray(cfg)
    except ConfigError:  # resources that do not fit (Ray stopped): the run says so in one line
        return False
    except BaseException:
        stop_early_ray()
        raise
    _started_early = True
    return True


def stop_early_ray() -> None:
    """Shut down the Ray `start_ray_early` started, if the run did not (it failed before its
    roles were up); nothing otherwise."""
    global _started_early
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _started_early = False


def start_ray(cfg: Config) -> str:
    """Connect this driver to Ray; returns the cluster's GCS address, or "local" for a private
    Ray (the one `start_ray_early` started, if it did)."""
    import ray

    if _started_early and ray.is_initialized():
        _fits_or_stop(cfg, ray)
        return "local"
    # Workers import the user's task module (env.module) from the driver's working directory;
    # under `ray job submit --working-dir .` each worker also starts in a copy of that folder.
    # They start with the environment every offpolicy process has (offline, quiet).
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    common = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True,
                  runtime_env={"env_vars": {"PYTHONPATH": path, **process_env()}})
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:  # a running cluster: `ray job submit` sets RAY_ADDRESS, as `offpolicy ablate` does
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except ConnectionError as e:
            raise ConfigError(f"cluster.address: no Ray cluster at '{address}' "
                              f"({str(e).splitlines()[0]})") from None
        return ray.get_runtime_context().gcs_address
    cl = cfg.cluster
    private_ray_auth()
    with _worker_niceness(0 if cfg.resources.actor_nice else None):
        # "local": a new instance even when this machine already runs a Ray cluster
        ray.init(address="local", num_cpus=cfg.resources.num_cpus or os.cpu_count(),
                 include_dashboard=cl.dashboard, dashboard_host=cl.dashboard_host,
                 dashboard_port=cl.dashboard_port, **common)
    _fits_or_stop(cfg, ray)  # a private Ray never grows: fail now, not hang
    return "local"


def _fits_or_stop(cfg: Config, ray) -> None:
    """`_check_fits` on the private Ray this process started; shut it down when the run does
    not fit (a caller in the same process, a test or `start_ray_early`, may start another)."""
    try:
        _check_fits(cfg, ray.cluster_resources())
    except ConfigError:
        ray.shutdown()
        raise


def _check_reachable(address: str) -> None:
    """A HOST:PORT that refuses or drops connections fails in seconds with one line (ray.init
    would retry for 20 s and print a warning every second)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or "://" in address:
        return  # `auto` and other forms: ray.init resolves and reports them
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"cluster.address: cannot reach a Ray cluster at {address} "
                          f"({e.strerror or e})") from None


def _check_fits(cfg: Config, have: dict) -> None:
    """The learner workers and actors fit in the resources of a (fixed-size) Ray instance."""
    need = _total(cfg)
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0) + 1e-9}
    if short:
        what = ", ".join(f"{v:g} {k} (Ray has {h:g})" for k, (v, h) in short.items())
        raise ConfigError(
            f"resources: {cfg.resources.learner_workers} learner worker(s) and "
            f"{cfg.rollout.num_actors} actor(s) need {what}; lower resources.actor_cpus, "
            "learner_cpus, *_gpus or rollout.num_actors")


@contextlib.contextmanager
def _worker_niceness(niceness: int | None):
    """Ray starts worker processes at niceness 15 (RAY_worker_niceness), so actors reniced to
    19 (`resources.actor_nice`) would still take about 30% of a core from a learner at 15.
    A local instance started here gets `niceness` for its workers unless the user set it."""
    if niceness is None or "RAY_worker_niceness" in os.environ:
        yield
        return
    os.environ["RAY_worker_niceness"] = str(niceness)  # read by the raylet ray.init spawns
    try:
        yield
    finally:
        del os.environ["RAY_worker_niceness"]


# ---------------------------------------------------------------------------------------------
# Placement groups


def _amounts(cpus: float, gpus: float, custom: dict) -> dict[str, float]:
    """One process's Ray resources, zeros left out (a bundle must ask for something)."""
    return {k: float(v) for k, v in {"CPU": cpus, "GPU": gpus, **custom}.items() if v}


def _roles(cfg: Config) -> dict[str, tuple[int, float, float, dict]]:
    """(processes, CPUs, GPUs, custom resources) per placed role."""
    res = cfg.resources
    return {"learner": (res.learner_workers, res.learner_cpus, res.learner_gpus,
                        res.learner_resources),
            "actor": (cfg.rollout.num_actors, res.actor_cpus, res.actor_gpus,
                      res.actor_resources)}


def _total(cfg: Config) -> dict[str, float]:
    total: dict[str, float] = {}
    for n, *amounts in _roles(cfg).values():
        for k, v in _amounts(*amounts).items():
            total[k] = total.get(k, 0.0) + n * v
    return total


def reserve(cfg: Config, ray, log=print) -> dict[str, list[dict]]:
    """Ray `.options(...)` for each learner worker ("learner"), rollout actor ("actor") and
    role without reserved CPUs ("local": the buffer, weight store and eval desk, on the
    driver's node).

    Unless `cluster.placement` is `none`, every learner worker and actor gets its own bundle of
    one placement group, and this returns only once the cluster has granted all of them: no
    process starts until the whole run fits (no half-started run holding CPUs).
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                                PlacementGroupSchedulingStrategy)

    roles = _roles(cfg)
    options = {name: [dict(num_cpus=cpus, num_gpus=gpus, resources=dict(custom))
                      for _ in range(n)] for name, (n, cpus, gpus, custom) in roles.items()}
    bundles = [(name, i, _amounts(*amounts)) for name, (n, *amounts) in roles.items()
               if _amounts(*amounts) for i in range(n)]
    if cfg.cluster.placement != "none" and bundles:
        group = placement_group([b for _, _, b in bundles], strategy=cfg.cluster.placement.upper(),
                                name=f"offpolicy-{os.getpid()}")
        _wait_granted(group, _total(cfg), cfg.cluster, ray, log)
        for index, (name, i, _) in enumerate(bundles):
            options[name][i]["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=index)
    here = ray.get_runtime_context().get_node_id()
    options["local"] = [dict(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        here, soft=False))]
    return options


def _wait_granted(group, need: dict, cl, ray, log, every_s: float = 30.0) -> None:
    """Block until the placement group is granted; say what it waits for every `every_s`."""
    t0 = time.monotonic()
    while True:
        left = cl.placement_timeout_s - (time.monotonic() - t0) if cl.placement_timeout_s else every_s
        ready, _ = ray.wait([group.ready()], timeout=max(0.0, min(every_s, left)))
        if ready:
            return
        asked = ", ".join(f"{v:g} {k}" for k, v in need.items())
        free = ray.available_resources()
        have = ", ".join(f"{free.get(k, 0):g} {k}" for k in need)
        if cl.placement_timeout_s and time.monotonic() - t0 >= cl.placement_timeout_s:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
            raise ConfigError(f"cluster.placement: the cluster did not grant {asked} "
                              f"({cl.placement}) within {cl.placement_timeout_s:g} s; free now: "
                              f"{have}")
        log(f"waiting for the cluster to grant {asked} ({cl.placement}); free now: {have}")


def _node_id(_instance) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def nodes_of(roles: dict, ray) -> dict:
    """The Ray node id each role process runs on, e.g. {"learner": [id], "actors": [id, id]}."""
    out = {}
    for name in ("buffer", "store", "learners", "actors"):
        handles = roles[name] if isinstance(roles[name], list) else [roles[name]]
        ids = ray.get([h.__ray_call__.remote(_node_id) for h in handles])
        out[name] = ids if isinstance(roles[name], list) else ids[0]
    out["driver"] = ray.get_runtime_context().get_node_id()
    return out


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


def renice(_instance, niceness: int) -> int:
    """Lower the priority of every thread of this process (Linux niceness is per thread)."""
    for tid in os.listdir("/proc/self/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
    return os.getpid()


def _niceness(_instance) -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def pin_roles(cfg, roles: dict, ray, nodes: dict) -> dict | None:
    """Pin the Ray roles of `start_roles` (and this driver process) and renice the actors;
    returns the core split used, if any. `nodes` is `nodes_of(roles)`: pinning needs every
    role on this machine, since core numbers are this machine's."""
    nice = cfg.resources.actor_nice
    if nice and hasattr(os, "setpriority"):
        learner_nice = ray.get(roles["learner"].__ray_call__.remote(_niceness))
        if learner_nice >= nice:  # e.g. a cluster whose raylet starts workers at 15
            print(f"warning: resources.actor_nice {nice} does not lower the actors below the "
                  f"learner (niceness {learner_nice}); start Ray with RAY_worker_niceness=0",
                  file=sys.stderr)
        ray.get([a.__ray_call__.remote(renice, nice) for a in roles["actors"]])
    split = core_split(cfg.resources.learner_cpus) if cfg.resources.pin_cpus else None
    if split is None:
        return None
    if {nodes["buffer"], nodes["store"], *nodes["learners"], *nodes["actors"]} != {nodes["driver"]}:
        print("warning: resources.pin_cpus ignored: the roles run on several nodes",
              file=sys.stderr)
        return None
    learner_cores, actor_cores = split
    refs = [h.__ray_call__.remote(_set_affinity, learner_cores)
            for h in (*roles["learners"], roles["buffer"], roles["store"], roles["desk"])]
    if not cfg.resources.actor_nice:  # reniced actors may use any core: they yield anyway
        refs += [a.__ray_call__.remote(_set_affinity, actor_cores) for a in roles["actors"]]
    ray.get(refs)
    os.sched_setaffinity(0, learner_cores)
    return {"learner": sorted(learner_cores), "actors": sorted(actor_cores)}
