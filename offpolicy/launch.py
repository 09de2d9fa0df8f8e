"""The one place that knows every role: starts Ray, places the roles, drives the run.

Reads: a validated Config. Writes: the run folder (config.yaml, metrics.jsonl, summary.json).

Processes (one Ray actor each): the replay buffer (threaded: actors block in `admit` while the
learner blocks in `sample`), a weight store, the learner, and `rollout.num_actors` rollout
actors. Roles are plain classes; `Remote` lets them call each other's Ray actors like local
objects, so the same classes run without Ray in tests. The driver only asks the learner for
steps, evaluations and writes metrics; data never passes through it (`RayRoles`).
With `resources.serial` the same classes share this one process and take turns, without Ray
(`SerialRoles`): the staleness ablation's layout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import yaml

from offpolicy.checkpoint import checkpoints, commit, staging
from offpolicy.config import Config, ConfigError, to_dict
from offpolicy.metrics import MetricsWriter, make_backends, write_summary
from offpolicy.placement import nodes_of, pin_roles, reserve, start_ray


class Remote:
    """Call a Ray actor like a local object: `proxy.m(*a)` is `ray.get(handle.m.remote(*a))`.

    Methods named in `fire_and_forget` return at once; the previous such call is awaited first,
    which bounds the calls in flight to one and surfaces a failure on the next call.
    """

    def __init__(self, handle, fire_and_forget: tuple[str, ...] = ()):
        self._handle, self._ff, self._pending = handle, fire_and_forget, None

    def __getattr__(self, name: str):
        import ray

        method = getattr(self._handle, name)
        if name in self._ff:
            def call(*args, **kwargs):
                if self._pending is not None:
                    ray.get(self._pending)
                self._pending = method.remote(*args, **kwargs)
            return call
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))

    def __getstate__(self):
        return {"_handle": self._handle, "_ff": self._ff, "_pending": None}

    def __setstate__(self, state):
        self.__dict__.update(state)


class ActorRef:
    """A Ray actor found by its name: it pickles as the name and looks the handle up where it
    is used. Roles get the buffer and weight store this way, so no actor handle rides in a
    restartable actor's constructor arguments (Ray cannot promise those survive a restart,
    and logs an error for every such actor)."""

    def __init__(self, name: str):
        import ray

        self.name, self._handle = name, None
        self.namespace = ray.get_runtime_context().namespace  # the driver's: actors differ

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return getattr(self._handle, attr)

    def __getstate__(self):
        return {"name": self.name, "namespace": self.namespace, "_handle": None}

    def __setstate__(self, state):
        self.__dict__.update(state)


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run folder; never silently mixes two runs' files."""
    if cfg.run.dir:
        run_dir = Path(cfg.run.dir)
        if (run_dir / "config.yaml").exists():
            if not cfg.run.overwrite:
                raise ConfigError(f"run.dir: {run_dir} already holds a run; choose another "
                                  "folder or set run.overwrite=true")
            for name in ("metrics.jsonl", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
    else:
        base = runs_root() / cfg.run.name
        run_dir, n = base, 2
        while (run_dir / "config.yaml").exists():
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
        cfg.run.dir = str(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, run_dir)
    except OSError as e:
        raise ConfigError(f"run.dir: cannot create or write {run_dir}: "
                          f"{e.strerror or type(e).__name__}") from None
    return run_dir


def write_config(cfg: Config, run_dir: Path) -> None:
    """The resolved config as `<run dir>/config.yaml`."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def runs_root() -> Path:
    """`runs/` in the working directory; ~/runs when that directory is the temporary copy
    `ray job submit --working-dir` made (Ray deletes it after the job)."""
    if "working_dir_files" in Path.cwd().parts[-2:-1]:
        return Path.home() / "runs"
    return Path("runs")


def start_roles(cfg: Config, model_path: str, log=print, stream: int = 0) -> dict:
    """Create buffer, weight store, learner worker(s) and actors as Ray actors, placed as
    `reserve` says; returns their handles ("learner" is rank 0 of "learners")."""
    import ray

    from offpolicy.actors.rollout import RolloutActor
    from offpolicy.buffer.replay import ReplayBuffer
    from offpolicy.learner.learner import Learner
    from offpolicy.learner.workers import LearnerWorker
    from offpolicy.weight_store import WeightStore
    from offpolicy.weights import FileSync, NCCLSync, ObjectStoreSync

    n, kind = cfg.rollout.num_actors, weight_sync_kind(cfg)
    where = reserve(cfg, ray, log)
    local = where["local"][0]
    lag = cfg.staleness.k if cfg.staleness.mode == "lag" else None
    names = {role: f"offpolicy-{role}-{uuid.uuid4().hex[:8]}" for role in ("buffer", "store")}
    buffer = ray.remote(ReplayBuffer).options(max_concurrency=2 * n + 8, name=names["buffer"],
                                              **local).remote(**ReplayBuffer.config_kwargs(cfg))
    keep = 1 if lag is None else lag + 2  # lag mode: actors load the exact version asked for
    store = ray.remote(WeightStore).options(name=names["store"], **local).remote(keep)
    store_ref = ActorRef(names["store"])
    sync = {"filesystem": lambda: FileSync(Remote(store_ref), weights_dir(cfg), keep=max(3, keep)),
            "object_store": lambda: ObjectStoreSync(store_ref),
            "nccl": lambda: NCCLSync(Remote(store_ref), [])}[kind]()
    # NCCL pushes weights into a running actor: a second thread takes those calls.
    actors = [ray.remote(RolloutActor).options(
        max_concurrency=2 if kind == "nccl" else 1, max_restarts=cfg.rollout.max_restarts,
        max_task_retries=0, **where["actor"][i]).remote(
        cfg, i, model_path, Remote(ActorRef(names["buffer"]), fire_and_forget=("add",)), sync,
        stream)
        for i in range(n)]
    if kind == "nccl":
        sync = NCCLSync(Remote(store_ref), actors,
                        tp=cfg.engine.vllm_args.get("tensor_parallel_size", 1))
    args = (cfg, model_path, Remote(ActorRef(names["buffer"])), sync)
    if cfg.resources.learner_workers == 1:
        learners = [ray.remote(Learner).options(**where["learner"][0]).remote(*args)]
    else:  # data-parallel: rank 0 offers a rendezvous address, then all join at once
        learners = [ray.remote(LearnerWorker).options(**opts).remote(*args)
                    for opts in where["learner"]]
        address = ray.get(learners[0].address.remote())
        ray.get([w.join.remote(address, rank, len(learners)) for rank, w in enumerate(learners)])
    return {"buffer": buffer, "store": store, "learner": learners[0], "learners": learners,
            "actors": actors}


def weight_sync_kind(cfg: Config) -> str:
    """`engine.weight_sync`, with `auto` resolved: vLLM reloads from files, HF from Ray."""
    if cfg.engine.weight_sync != "auto":
        return cfg.engine.weight_sync
    return "filesystem" if cfg.engine.name == "vllm" else "object_store"


def weights_dir(cfg: Config) -> Path:
    """Where FileSync writes: engine.weights_dir, else <run dir>/weights (removed at the end)."""
    if cfg.engine.weights_dir:
        return Path(cfg.engine.weights_dir).expanduser().resolve() / Path(cfg.run.dir).name
    return Path(cfg.run.dir).resolve() / "weights"


def train(cfg: Config, log=print, resume: tuple[Path, dict] | None = None) -> dict:
    """Run `offpolicy train`: build/load the base model, start roles, train, write the run
    folder. `resume` = (checkpoint folder, its driver state) from `checkpoint.latest`: continue
    that run in its own folder from the checkpoint's step."""
    import ray
    import torch

    t_start = time.perf_counter()
    run_dir = prepare_run_dir(cfg) if resume is None else reopen_run_dir(cfg, resume[1]["step"])
    log(f"run folder: {run_dir}")
    from offpolicy.models import build_info, ensure_base_model, environment_info

    model_path = str(resume[0] / "model") if resume else str(ensure_base_model(cfg, log=log))
    if cfg.loss.kl_coef > 0 and not cfg.loss.kl_reference:  # the base model, recorded
        cfg.loss.kl_reference = str(ensure_base_model(cfg, log=log)) if resume else model_path
        write_config(cfg, run_dir)
    first = resume[1]["step"] + 1 if resume else 1
    torch.set_num_threads(1)  # the driver only coordinates from here on
    driver_cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    summary = {"run_dir": str(run_dir), "model_path": model_path, "interrupted": False,
               "base_model_build": build_info(model_path), "machine": environment_info()}
    restore = signal.signal(signal.SIGTERM, _raise_interrupt)
    writer = None
    try:
        session = (SerialRoles(cfg, model_path, first - 1) if cfg.resources.serial
                   else RayRoles(cfg, model_path, log, first - 1))
        workers = cfg.resources.learner_workers
        log(f"started {'learner' if workers == 1 else f'{workers} learner workers'}, buffer and "
            f"{cfg.rollout.num_actors} rollout actor(s)"
            f"{' in this process' if cfg.resources.serial else ''}; base model {model_path}")
        if not cfg.resources.serial:
            summary["cluster"], summary["placement"] = session.cluster, session.nodes
        if resume:
            summary["resumed_from"] = session.load_state(resume[0])
            log(f"resumed from {resume[0]}: learner version {summary['resumed_from']}")
        summary["base_eval_reward"] = session.evaluate()
        log(f"base eval reward {summary['base_eval_reward']:.3f}")
        writer = MetricsWriter(run_dir, cfg.learner.steps, cfg.log.progress_every_s,
                               backends=make_backends(cfg, run_dir))
        t_loop = time.perf_counter()
        summary.update(_train_loop(cfg, session, writer, t_start, run_dir, first,
                                   resume[1]["totals"] if resume else None))
        summary["train_s"] = time.perf_counter() - t_loop
        summary["buffer"], summary["actors"], summary["ledger"] = session.finish(
            run_dir / "checkpoints" / "final")
        log(describe_ledger(summary["ledger"]))
    except KeyboardInterrupt:
        summary["interrupted"] = True
        log("interrupted: stopping all roles")
    except ConfigError:
        raise
    except Exception as e:  # a role failed: say so in one line and how to continue
        summary["error"] = _one_line(e)
        newest = checkpoints(run_dir)
        hint = (f"resume from {newest[-1].name} with `offpolicy train --resume {run_dir}`"
                if newest else "no checkpoint was written yet (checkpoint.every)")
        raise RuntimeError(f"run failed: {summary['error']}; {hint}") from e
    finally:
        if writer is not None:
            writer.close()
        signal.signal(signal.SIGTERM, restore)
        if not cfg.resources.serial:
            ray.shutdown()
        if driver_cores is not None:  # resources.pin_cpus may have pinned this process
            os.sched_setaffinity(0, driver_cores)
        shutil.rmtree(weights_dir(cfg), ignore_errors=True)  # FileSync's working copies
        summary["wall_s"] = time.perf_counter() - t_start
        write_summary(run_dir, summary)
    return summary


def _one_line(e: BaseException) -> str:
    """`Type: first line` of an error; for a Ray task error, of the error raised in the role."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def reopen_run_dir(cfg: Config, step: int) -> Path:
    """A resumed run's folder: config.yaml rewritten (with any new overrides), metrics.jsonl
    cut back to the checkpoint's step (the lines after it belong to the lost stretch)."""
    run_dir = Path(cfg.run.dir)
    write_config(cfg, run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        keep = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        metrics.write_text("".join(line + "\n" for line in keep))
    return run_dir


def _train_loop(cfg: Config, session, writer: MetricsWriter, t_start: float, run_dir: Path,
                first: int = 1, totals: dict | None = None) -> dict:
    """Ask the learner for updates `first`..`learner.steps`; evaluate every `eval.every`; write
    metrics; checkpoint every `checkpoint.every`. Running totals survive a resume (`totals`)."""
    out = totals or {"steps": 0, "samples": 0, "final_eval_reward": None, "staleness_sum": 0.0,
                     "staleness_max": 0}
    for step in range(first, cfg.learner.steps + 1):
        m = session.step()
        if step % cfg.eval.every == 0 or step == cfg.learner.steps:
            m["eval/reward"] = session.evaluate()
            out["final_eval_reward"] = m["eval/reward"]
        m["time/elapsed_s"] = time.perf_counter() - t_start
        writer.write(m)
        out["staleness_sum"] += m["staleness/mean"]
        out["steps"], out["samples"] = step, out["samples"] + m["learner/batch_size"]
        out["samples_per_s"] = m["throughput/samples_per_s"]
        out["staleness_max"] = max(out["staleness_max"], m["staleness/max"])
        every = cfg.checkpoint.every if cfg.staleness.mode == "bound" else 0  # see CLI resume
        if every and step % every == 0 and step < cfg.learner.steps:
            folder = staging(run_dir, step)  # complete, or invisible: see offpolicy/checkpoint
            session.save_state(folder, cfg.checkpoint.buffer)
            commit(folder, {"step": step, "totals": out}, cfg.checkpoint.keep)
    out["staleness_mean"] = out["staleness_sum"] / max(out["steps"], 1)
    return out


class RayRoles:
    """Every role its own Ray actor (process); rollout actors generate continuously."""

    def __init__(self, cfg: Config, model_path: str, log=print, stream: int = 0):
        import ray

        self.cluster = start_ray(cfg)
        # Holding every handle keeps its actor alive: roles reach the buffer and weight store
        # by name (ActorRef), which does not.
        self.roles = roles = start_roles(cfg, model_path, log, stream)
        self.learners, self.buffer = roles["learners"], roles["buffer"]
        self.nodes = nodes_of(roles, ray)
        log(describe_nodes(self.nodes))
        self.pinned = pin_roles(cfg, roles, ray, self.nodes)  # before the actors' loops start
        self.actors, self.cfg, self.log = roles["actors"], cfg, log
        self.pids = ray.get([a.__ray_call__.remote(_pid) for a in self.actors])
        self.runs = [a.run.remote() for a in self.actors]
        self.restarts = [0] * len(self.actors)
        self.ray = ray

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
                     f"({_one_line(e)})")
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
                    f"times): {_one_line(e)}") from None
            if pid != self.pids[i]:  # a new process, not a passing unavailability
                self.pids[i] = pid
                self.restarts[i] += 1
                self.log(f"rollout actor {i} died; Ray restarted it "
                         f"({self.restarts[i]}/{self.cfg.rollout.max_restarts}); its batch in "
                         "flight is counted as lost")
                if self.cfg.resources.actor_nice:  # the new process starts at Ray's niceness
                    from offpolicy.placement import _renice

                    self.ray.get(self.actors[i].__ray_call__.remote(
                        _renice, self.cfg.resources.actor_nice))
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

    def evaluate(self) -> float:
        return self.ray.get(self.learners[0].evaluate.remote())

    def save_state(self, folder: Path, with_buffer: bool) -> None:
        """Rank 0's policy and optimizer, and the buffer's snapshot, into `folder`."""
        refs = [self.learners[0].save_state.remote(str(folder))]
        if with_buffer:
            refs.append(self.buffer.save.remote(str(folder / "buffer.pkl")))
        self.ray.get(refs)

    def load_state(self, folder: Path) -> int:
        """Every learner worker continues from `folder` (after the buffer's snapshot)."""
        if (folder / "buffer.pkl").is_file():
            self.ray.get(self.buffer.load.remote(str(folder / "buffer.pkl")))
        return self.ray.get([w.load_state.remote(str(folder)) for w in self.learners])[0]

    def finish(self, checkpoint: Path) -> tuple[dict, list[dict], dict]:
        """Save the policy, stop the actors; returns (buffer stats, each actor's counts, the
        buffer's ledger once every actor has stopped)."""
        ray = self.ray
        ray.get(self.learners[0].save.remote(str(checkpoint)))
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


def describe_ledger(ledger: dict) -> str:
    """One line: where the run's episodes went, and whether every one is accounted for."""
    fates = ", ".join(f"{k} {ledger[k]}" for k in (
        "retired", "filtered", "evicted_staleness", "evicted_capacity", "evicted_surplus",
        "in_buffer", "env_errors", "lost") if ledger[k])
    if ledger["balanced"]:
        return f"ledger: {ledger['admitted']} episodes: {fates}; all accounted for"
    return (f"error: ledger does not balance: {ledger}; some trajectories went uncounted "
            "(please report this)")


def describe_nodes(nodes: dict) -> str:
    """One line: which node each role landed on (node ids shortened to 6 characters)."""
    def count(ids):
        tally = {}
        for i in ids:
            tally[i[:6]] = tally.get(i[:6], 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in tally.items())
    every = {nodes["buffer"], nodes["store"], nodes["driver"], *nodes["learners"], *nodes["actors"]}
    return (f"placement: {len(every)} node(s); driver, buffer and store on {nodes['driver'][:6]}; "
            f"learner worker(s) on {count(nodes['learners'])}; actors on {count(nodes['actors'])}")


class SerialRoles:
    """`resources.serial`: the same role classes in this process, taking turns. Before each
    update the actors (round robin) generate until the buffer holds that update's batch."""

    def __init__(self, cfg: Config, model_path: str, stream: int = 0):
        from offpolicy.actors.rollout import RolloutActor
        from offpolicy.buffer.replay import ReplayBuffer
        from offpolicy.learner.learner import Learner
        from offpolicy.weights import LocalSync

        lag = cfg.staleness.mode == "lag"
        self.buffer = ReplayBuffer(**ReplayBuffer.config_kwargs(cfg))
        sync = LocalSync(keep=cfg.staleness.k + 2 if lag else 1)
        self.actors = [RolloutActor(cfg, i, model_path, self.buffer, sync, stream)
                       for i in range(cfg.rollout.num_actors)]
        self.learner = Learner(cfg, model_path, self.buffer, sync)
        self.turn = 0

    def step(self) -> dict:
        refused = 0
        while not self.buffer.ready(self.learner.version):
            actor = self.actors[self.turn % len(self.actors)]
            self.turn += 1
            refused = refused + 1 if actor.one_batch(timeout=0) == "refused" else 0
            if refused >= len(self.actors):  # nobody may generate and no batch is ready
                raise RuntimeError("serial layout: the buffer admits no work and holds no batch "
                                   f"for update {self.learner.version}")
        return self.learner.step()

    def evaluate(self) -> float:
        return self.learner.evaluate()

    def save_state(self, folder: Path, with_buffer: bool) -> None:
        self.learner.save_state(str(folder))
        if with_buffer:
            self.buffer.save(folder / "buffer.pkl")

    def load_state(self, folder: Path) -> int:
        if (folder / "buffer.pkl").is_file():
            self.buffer.load(folder / "buffer.pkl")
        return self.learner.load_state(str(folder))

    def finish(self, checkpoint: Path) -> tuple[dict, list[dict], dict]:
        self.learner.save(str(checkpoint))
        self.buffer.close()
        return (self.buffer.stats(), [dict(a.counts) for a in self.actors],
                self.buffer.ledger(final=True))


def _pid(_instance) -> int:
    return os.getpid()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
