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

import os
import shutil
import signal
import time
from pathlib import Path

import yaml

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
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def runs_root() -> Path:
    """`runs/` in the working directory; ~/runs when that directory is the temporary copy
    `ray job submit --working-dir` made (Ray deletes it after the job)."""
    if "working_dir_files" in Path.cwd().parts[-2:-1]:
        return Path.home() / "runs"
    return Path("runs")


def start_roles(cfg: Config, model_path: str, log=print) -> dict:
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
    buffer = ray.remote(ReplayBuffer).options(max_concurrency=2 * n + 8, **local).remote(
        **ReplayBuffer.config_kwargs(cfg))
    keep = 1 if lag is None else lag + 2  # lag mode: actors load the exact version asked for
    store = ray.remote(WeightStore).options(**local).remote(keep)
    sync = {"filesystem": lambda: FileSync(Remote(store), weights_dir(cfg), keep=max(3, keep)),
            "object_store": lambda: ObjectStoreSync(store),
            "nccl": lambda: NCCLSync(Remote(store), [])}[kind]()
    # NCCL pushes weights into a running actor: a second thread takes those calls.
    actors = [ray.remote(RolloutActor).options(
        max_concurrency=2 if kind == "nccl" else 1, **where["actor"][i]).remote(
        cfg, i, model_path, Remote(buffer, fire_and_forget=("add",)), sync) for i in range(n)]
    if kind == "nccl":
        sync = NCCLSync(Remote(store), actors, tp=cfg.engine.vllm_args.get("tensor_parallel_size", 1))
    args = (cfg, model_path, Remote(buffer), sync)
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


def train(cfg: Config, log=print) -> dict:
    """Run `offpolicy train`: build/load the base model, start roles, train, write the run folder."""
    import ray
    import torch

    t_start = time.perf_counter()
    run_dir = prepare_run_dir(cfg)
    log(f"run folder: {run_dir}")
    from offpolicy.models import ensure_base_model

    model_path = str(ensure_base_model(cfg, log=log))
    torch.set_num_threads(1)  # the driver only coordinates from here on
    driver_cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    summary = {"run_dir": str(run_dir), "model_path": model_path, "interrupted": False}
    restore = signal.signal(signal.SIGTERM, _raise_interrupt)
    writer = None
    try:
        session = (SerialRoles(cfg, model_path) if cfg.resources.serial
                   else RayRoles(cfg, model_path, log))
        workers = cfg.resources.learner_workers
        log(f"started {'learner' if workers == 1 else f'{workers} learner workers'}, buffer and "
            f"{cfg.rollout.num_actors} rollout actor(s)"
            f"{' in this process' if cfg.resources.serial else ''}; base model {model_path}")
        if not cfg.resources.serial:
            summary["cluster"], summary["placement"] = session.cluster, session.nodes
        summary["base_eval_reward"] = session.evaluate()
        log(f"base eval reward {summary['base_eval_reward']:.3f}")
        writer = MetricsWriter(run_dir, cfg.learner.steps, cfg.log.progress_every_s,
                               backends=make_backends(cfg, run_dir))
        t_loop = time.perf_counter()
        summary.update(_train_loop(cfg, session, writer, t_start))
        summary["train_s"] = time.perf_counter() - t_loop
        summary["buffer"], summary["actors"] = session.finish(run_dir / "checkpoints" / "final")
    except KeyboardInterrupt:
        summary["interrupted"] = True
        log("interrupted: stopping all roles")
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


def _train_loop(cfg: Config, session, writer: MetricsWriter, t_start: float) -> dict:
    """Ask the learner for `learner.steps` updates; evaluate every `eval.every`; write metrics."""
    out = {"steps": 0, "samples": 0, "final_eval_reward": None}
    staleness = []
    for step in range(1, cfg.learner.steps + 1):
        m = session.step()
        if step % cfg.eval.every == 0 or step == cfg.learner.steps:
            m["eval/reward"] = session.evaluate()
            out["final_eval_reward"] = m["eval/reward"]
        m["time/elapsed_s"] = time.perf_counter() - t_start
        writer.write(m)
        staleness.append(m["staleness/mean"])
        out["steps"], out["samples"] = step, out["samples"] + m["learner/batch_size"]
        out["samples_per_s"] = m["throughput/samples_per_s"]
        out["staleness_max"] = max(out.get("staleness_max", 0), m["staleness/max"])
    out["staleness_mean"] = sum(staleness) / max(len(staleness), 1)
    return out


class RayRoles:
    """Every role its own Ray actor (process); rollout actors generate continuously."""

    def __init__(self, cfg: Config, model_path: str, log=print):
        import ray

        self.cluster = start_ray(cfg)
        roles = start_roles(cfg, model_path, log)
        self.learners, self.buffer = roles["learners"], roles["buffer"]
        self.nodes = nodes_of(roles, ray)
        log(describe_nodes(self.nodes))
        self.pinned = pin_roles(cfg, roles, ray, self.nodes)  # before the actors' loops start
        self.runs = [a.run.remote() for a in roles["actors"]]
        self.ray = ray

    def step(self) -> dict:
        """One update: every learner worker steps (data-parallel workers meet in collectives);
        an actor whose loop ends meanwhile stops the run with its error."""
        refs = [w.step.remote() for w in self.learners]
        pending = list(refs)
        while pending:
            done, _ = self.ray.wait(pending + self.runs, num_returns=1)
            if done[0] not in pending:  # an actor's loop ended: re-raise its error, or say so
                self.ray.get(done[0])
                raise RuntimeError("a rollout actor stopped before the run ended")
            self.ray.get(done[0])  # a failed worker raises here, not after its peers time out
            pending.remove(done[0])
        return self.ray.get(refs[0])

    def evaluate(self) -> float:
        return self.ray.get(self.learners[0].evaluate.remote())

    def finish(self, checkpoint: Path) -> tuple[dict, list[dict]]:
        """Save the policy, stop the actors; returns (buffer stats, each actor's counts)."""
        ray = self.ray
        ray.get(self.learners[0].save.remote(str(checkpoint)))
        stats = ray.get(self.buffer.stats.remote())
        ray.get(self.buffer.close.remote())
        return stats, ray.get(self.runs)


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

    def __init__(self, cfg: Config, model_path: str):
        from offpolicy.actors.rollout import RolloutActor
        from offpolicy.buffer.replay import ReplayBuffer
        from offpolicy.learner.learner import Learner
        from offpolicy.weights import LocalSync

        lag = cfg.staleness.mode == "lag"
        self.buffer = ReplayBuffer(**ReplayBuffer.config_kwargs(cfg))
        sync = LocalSync(keep=cfg.staleness.k + 2 if lag else 1)
        self.actors = [RolloutActor(cfg, i, model_path, self.buffer, sync)
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

    def finish(self, checkpoint: Path) -> tuple[dict, list[dict]]:
        self.learner.save(str(checkpoint))
        self.buffer.close()
        return self.buffer.stats(), [dict(a.counts) for a in self.actors]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
