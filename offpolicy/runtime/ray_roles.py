"""The Ray layout: every role its own Ray actor (process), placed on the cluster's nodes.

Reads: a validated Config and its run plan, the base model's path. Writes: nothing itself; the
roles write. Processes: the replay buffer (threaded: actors block in `admit` while the learner
blocks in `sample`), a weight store, the desk, the learner (or `resources.learner_workers`
data-parallel workers), and `rollout.num_actors` rollout actors, which generate continuously.
Roles reach the buffer, the weight store and the desk by name (`remote.ActorRef`) through
`remote.Remote`, so the same classes run without Ray in the serial layout and in tests. The
driver (`launch.py`) only asks the learner for steps and evaluations; data never passes
through it. Each role's process is set up once, before the role is built (`_role_class`:
environment and torch threads).

This module, `placement.py` and `remote.py` are the wiring: the only places that start Ray
actors. A `Layout` (layout.py).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import ray

from offpolicy.actors.rollout import RolloutActor
from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.config.plan import RunPlan
from offpolicy.config.schema import Config
from offpolicy.core.errors import one_line
from offpolicy.core.process import built_without_gc, setup_process
from offpolicy.learner.learner import Learner
from offpolicy.learner.workers import LearnerWorker
from offpolicy.runtime.desk import Desk
from offpolicy.runtime.layout import buffer_arguments
from offpolicy.runtime.placement import nodes_of, pin_roles, renice, reserve, start_ray
from offpolicy.runtime.remote import ActorRef, Remote
from offpolicy.runtime.run_dir import weights_dir
from offpolicy.weights.store import WeightStore
from offpolicy.weights.sync import WEIGHT_SYNCS


class RayRoles:
    """Every role its own Ray actor (process); rollout actors generate continuously."""

    def __init__(self, cfg: Config, plan: RunPlan, model_path: str, log=print, stream: int = 0):
        self.ray, self.cfg, self.log = ray, cfg, log
        self.cluster = start_ray(cfg)
        self._startup = {"ray": time.time()}  # start-up marks (Unix times) for the driver
        try:
            # Holding every handle keeps its actor alive: roles reach the buffer, the weight
            # store and the desk by name (ActorRef), which does not.
            self.roles = roles = start_roles(cfg, plan, model_path, log, stream)
            self.learners, self.buffer = roles["learners"], roles["buffer"]
            self.desk = roles["desk"]
            self.nodes = nodes_of(roles, ray)
            log(describe_nodes(self.nodes))
            self.pinned = pin_roles(cfg, roles, ray, self.nodes)  # before the actors' loops
            self.actors = roles["actors"]
            self.pids = ray.get([a.__ray_call__.remote(_pid) for a in self.actors])
            self._startup.update(
                learner=ray.get(roles["learner"].__ray_call__.remote(_ready_at)),
                actors=max(ray.get([a.__ray_call__.remote(_ready_at) for a in self.actors])))
        except BaseException:
            ray.shutdown()  # a half-started session leaves nothing behind
            raise
        self.runs: list = []
        self.restarts = [0] * len(self.actors)

    def startup(self) -> dict:
        return self._startup

    def start(self) -> None:
        """Start the actors' generation loops (after any resumed state is loaded, so no batch
        is admitted by a buffer about to be replaced)."""
        self.runs = [a.run.remote() for a in self.actors]

    def step(self) -> dict:
        """One update: every learner worker steps (data-parallel workers meet in collectives);
        an actor whose loop ends meanwhile stops the run with its error."""
        refs = [w.step.remote() for w in self.learners]
        pending = list(refs)
        warn_s = self.cfg.log.stall_warn_s or None
        since, stats = time.monotonic(), None
        while pending:
            done, _ = self.ray.wait(pending + self.runs, num_returns=1, timeout=warn_s)
            if not done:  # no step for log.stall_warn_s: say what the learner waits for
                stats = self._describe_stall(time.monotonic() - since, stats)
                continue
            if done[0] not in pending:  # an actor's loop ended
                self._actor_ended(self.runs.index(done[0]))
                continue
            self.ray.get(done[0])  # a failed worker raises here, not after its peers time out
            pending.remove(done[0])
        return self.ray.get(refs[0])

    def _describe_stall(self, waited_s: float, before: dict | None) -> dict:
        """Log one line on what a stalled learner waits for; returns the buffer's counts, the
        baseline of the next line's "since then" numbers."""
        try:
            now = self.ray.get(self.buffer.stats.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001 - a stalled buffer is itself the answer
            self.log(f"no learner step for {waited_s:.0f}s; the buffer does not answer either "
                     f"({one_line(e)})")
            return before or {}
        before = before or {}
        delta = {k: now[k] - before.get(k, 0) for k in
                 ("buffer/added", "buffer/filtered", "buffer/admission_waits")}
        hint = ""
        if delta["buffer/added"] and delta["buffer/filtered"] >= 0.9 * delta["buffer/added"]:
            hint = ("; nearly every group scores all-equal rewards (see buffer.filter_floor, "
                    "engine.temperature)")
        self.log(f"no learner step for {waited_s:.0f}s: waiting for a batch of "
                 f"{self.cfg.learner.batch_groups} groups; the buffer holds "
                 f"{now['buffer/groups']} groups; {'since the last notice' if before else 'so far'}"
                 f": {delta['buffer/added']} episodes arrived, {delta['buffer/filtered']} of them "
                 f"dropped as uniform, {delta['buffer/admission_waits']} admission waits{hint}")
        return now

    def _actor_ended(self, i: int) -> None:
        """Actor i's loop ended before the run did. If its process died, Ray restarts it (up
        to rollout.max_restarts), its loop starts again and the buffer counts its lost batch.
        Anything else (an error raised in the actor, or a clean stop) ends the run."""
        try:
            self.ray.get(self.runs[i])
        except self.ray.exceptions.RayActorError as e:
            pid = self._wait_restarted(i)
            if pid is None:
                raise RuntimeError(
                    f"rollout actor {i} died and Ray did not restart it (restarted "
                    f"{self.restarts[i]} of rollout.max_restarts={self.cfg.rollout.max_restarts} "
                    f"times): {one_line(e)}") from None
            if pid != self.pids[i]:  # a new process, not a passing unavailability
                self.pids[i] = pid
                self.restarts[i] += 1
                self.log(f"rollout actor {i} died; Ray restarted it "
                         f"({self.restarts[i]}/{self.cfg.rollout.max_restarts}); its batch in "
                         "flight is counted as lost")
                if self.cfg.resources.actor_nice:  # the new process starts at Ray's niceness
                    self.ray.get(self.actors[i].__ray_call__.remote(
                        renice, self.cfg.resources.actor_nice))
            self.runs[i] = self.actors[i].run.remote()
            return
        raise RuntimeError(f"rollout actor {i} stopped before the run ended")

    def _wait_restarted(self, i: int, timeout_s: float = 300.0) -> int | None:
        """Actor i's process id once it answers again (Ray restarts a dead actor
        asynchronously: meanwhile calls fail as unavailable); None if Ray gave it up."""
        exc = self.ray.exceptions
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return self.ray.get(self.actors[i].__ray_call__.remote(_pid))
            except exc.ActorUnavailableError:
                time.sleep(0.5)
            except exc.RayActorError:  # died for good (out of restarts)
                return None
        return None

    def evaluate(self) -> dict:
        return self._evaluate("")

    def evaluate_weights(self, weights: str) -> dict:
        return self._evaluate(weights)

    def _evaluate(self, weights: str) -> dict:
        """The held-out eval of the learner's newest weights (published first if they were
        not yet), or of the model folder `weights`, on actor 0's engine between its batches
        (the learner never stops to evaluate); waits for it."""
        target = 0
        if not weights:  # every worker: with learner.sharding=fsdp the gather is a collective
            target = self.ray.get([w.publish_latest.remote() for w in self.learners])[0]
        self.ray.get(self.desk.request.remote(weights))
        since = time.monotonic()
        while True:
            for result in self.eval_results():
                if result.get("eval/weights", "") == weights and result["eval/version"] >= target:
                    return result
            done, _ = self.ray.wait(self.runs, num_returns=1, timeout=0.2)
            if done:  # an actor's loop ended (actor 0 may have died evaluating)
                self._actor_ended(self.runs.index(done[0]))
            if self.cfg.log.stall_warn_s and time.monotonic() - since > self.cfg.log.stall_warn_s:
                self.log(f"waiting {time.monotonic() - since:.0f}s for the eval of version "
                         f"{target} on rollout actor 0")
                since = time.monotonic()

    def request_eval(self) -> None:
        """Ask actor 0 for an eval with the newest weights at its next batch; results come
        back through `eval_results`."""
        self.ray.get(self.desk.request.remote())

    def eval_results(self) -> list[dict]:
        return self.ray.get(self.desk.results.remote())

    def save_state(self, folder: Path, with_buffer: bool) -> None:
        """The policy and optimizer (rank 0 writes them; sharded, each worker its shard of the
        optimizer), and the buffer's snapshot, into `folder`; with the buffer, the actors'
        episodes in flight too: the desk holds every actor, each writes its snapshot into
        `folder/actors` and waits, so that actors, buffer and learner agree on every episode."""
        if with_buffer:
            self._hold_actors(folder / "actors")
        try:
            refs = [w.save_state.remote(str(folder)) for w in self.learners]
            if with_buffer:
                refs.append(self.buffer.save.remote(str(folder / "buffer.pkl")))
            self.ray.get(refs)
        finally:
            self.ray.get(self.desk.release.remote())

    def _hold_actors(self, folder: Path, timeout_s: float = 120.0) -> None:
        """Ask every actor for its snapshot and wait until all wrote theirs (an actor that does
        not answer in time, dead or restarting, is left out: its episodes restart)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.ray.get(self.desk.hold.remote(str(folder)))
        deadline = time.monotonic() + timeout_s
        while self.ray.get(self.desk.held_count.remote()) < len(self.actors):
            if time.monotonic() > deadline:
                self.log(f"checkpoint: only {self.ray.get(self.desk.held_count.remote())} of "
                         f"{len(self.actors)} rollout actors wrote their episodes in flight; "
                         "the others' episodes will restart on resume")
                return
            time.sleep(0.05)

    def load_state(self, folder: Path) -> int:
        """Every learner worker continues from `folder` (after the buffer's snapshot), and
        each actor from its snapshot of the episodes in flight; what no actor takes on is
        counted lost."""
        if (folder / "buffer.pkl").is_file():
            self.ray.get(self.buffer.load.remote(str(folder / "buffer.pkl")))
        version = self.ray.get([w.load_state.remote(str(folder)) for w in self.learners])[0]
        self.ray.get([a.restore.remote(str(folder / "actors" / f"actor{i}.pkl"))
                      for i, a in enumerate(self.actors)])
        self.ray.get(self.buffer.settle_restore.remote())
        return version

    def finish(self, checkpoint: Path) -> tuple[dict, list[dict], dict]:
        """Save the policy, stop the actors; returns (buffer stats, each actor's counts, the
        buffer's ledger once every actor has stopped)."""
        ray = self.ray
        ray.get([w.save.remote(str(checkpoint)) for w in self.learners])  # rank 0 writes
        ray.get(self.buffer.close.remote())
        counts = []
        for i, run in enumerate(self.runs):
            try:
                counts.append(ray.get(run))
            except ray.exceptions.RayActorError:  # died at the very end: its batch is lost
                counts.append({"died": True})
        counts = [{**c, "restarts": r} for c, r in zip(counts, self.restarts)]
        return (ray.get(self.buffer.stats.remote()), counts,
                ray.get(self.buffer.ledger.remote(final=True)))

    def close(self) -> None:
        """Stop every role (Ray kills the actors with the session)."""
        self.ray.shutdown()


def start_roles(cfg: Config, plan: RunPlan, model_path: str, log=print, stream: int = 0) -> dict:
    """Create buffer, weight store, desk, learner worker(s) and actors as Ray actors, placed as
    `reserve` says; returns their handles ("learner" is rank 0 of "learners")."""
    n = cfg.rollout.num_actors
    where = reserve(cfg, ray, log)
    local = where["local"][0]
    names = {role: f"offpolicy-{role}-{uuid.uuid4().hex[:8]}"
             for role in ("buffer", "store", "desk")}
    buffer = ray.remote(ReplayBuffer).options(max_concurrency=2 * n + 8, name=names["buffer"],
                                              **local).remote(**buffer_arguments(cfg, plan))
    store = ray.remote(WeightStore).options(name=names["store"], **local).remote(
        plan.store_versions)
    desk = ray.remote(Desk).options(name=names["desk"], **local).remote()
    sync_class = WEIGHT_SYNCS.lookup(plan.weight_sync)
    sync = sync_class.build(cfg, plan, Remote(ActorRef(names["store"])), weights_dir(cfg))
    # A sync that pushes weights into running actors (NCCL): a second thread takes those calls.
    actor_class = _role_class(RolloutActor, plan.actor_threads)
    actors = [actor_class.options(
        max_concurrency=2 if sync.pushes else 1, max_restarts=cfg.rollout.max_restarts,
        max_task_retries=0, **where["actor"][i]).remote(
        cfg, i, model_path, Remote(ActorRef(names["buffer"]),
                                   fire_and_forget=("add", "add_segments")), sync,
        stream, desk=Remote(ActorRef(names["desk"])))
        for i in range(n)]
    if sync.pushes:
        sync.attach(actors)  # the learner's copy pushes into them
    args = (cfg, model_path, Remote(ActorRef(names["buffer"])), sync)
    if cfg.resources.learner_workers == 1 and cfg.learner.sharding == "none":
        learners = [_role_class(Learner, plan.learner_threads).options(
            **where["learner"][0]).remote(*args, plan=plan)]
    else:  # data-parallel: rank 0 offers a rendezvous address, then all join at once
        worker_class = _role_class(LearnerWorker, plan.learner_threads)
        learners = [worker_class.options(**opts).remote(*args, plan=plan)
                    for opts in where["learner"]]
        host = ray.get(learners[0].__ray_call__.remote(_node_ip))
        address = ray.get(learners[0].address.remote(host))
        ray.get([w.join.remote(address, rank, len(learners)) for rank, w in enumerate(learners)])
    return {"buffer": buffer, "store": store, "desk": desk, "learner": learners[0],
            "learners": learners, "actors": actors}


def _role_class(cls: type, threads: int):
    """`cls` as a Ray actor class whose process is set up before the role is built: the
    environment every offpolicy process has, and this role's torch threads (several role
    processes share the machine's cores). The one place a Ray role's threads are set."""
    class Role(cls):
        def __init__(self, *args, **kwargs):
            with built_without_gc():
                setup_process(threads)
                super().__init__(*args, **kwargs)
            self.offpolicy_ready_at = time.time()  # for the driver's start-up breakdown

    Role.__name__ = Role.__qualname__ = cls.__name__
    return ray.remote(Role)


def describe_nodes(nodes: dict) -> str:
    """One line: which node each role landed on (node ids shortened to 6 characters)."""
    def count(ids):
        tally = {}
        for i in ids:
            tally[i[:6]] = tally.get(i[:6], 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in tally.items())
    every = {nodes["buffer"], nodes["store"], nodes["driver"], *nodes["learners"],
             *nodes["actors"]}
    return (f"placement: {len(every)} node(s); driver, buffer and store on {nodes['driver'][:6]}; "
            f"learner worker(s) on {count(nodes['learners'])}; actors on {count(nodes['actors'])}")


def _ready_at(instance) -> float:
    return instance.offpolicy_ready_at


def _pid(_instance) -> int:
    return os.getpid()


def _node_ip(_instance) -> str:
    """The node address of the actor it runs in (rank 0's, for the rendezvous)."""
    return ray.util.get_node_ip_address()
