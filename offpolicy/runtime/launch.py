"""`offpolicy train`: the driver. Builds the base model, starts the roles, runs the loop.

Reads: a validated Config. Writes: the run folder (config.yaml via `run_dir.py`,
metrics.jsonl, summary.json, checkpoints/).

The run plan (`RunPlan.of`) is made here, once, and handed to the layout. The roles run in one
of two layouts with one interface (`layout.Layout`): `ray_roles.RayRoles`, every role its own
Ray actor, and `serial_roles.SerialRoles` (`resources.serial`), every role in this process,
taking turns. The driver only asks the learner for steps and evaluations, writes metrics and
checkpoints; data never passes through it.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from offpolicy.config.plan import RunPlan
from offpolicy.config.schema import Config
from offpolicy.core.errors import ConfigError, one_line
from offpolicy.core.machine import cpu_bf16, process_started_at
from offpolicy.core.process import environment_info, setup_process
from offpolicy.models.sources import ensure_base_model
from offpolicy.models.tiny import build_info
from offpolicy.runtime.checkpoint import checkpoints, commit, staging
from offpolicy.runtime.layout import Layout
from offpolicy.runtime.metrics import MetricsWriter, make_backends, write_summary
from offpolicy.runtime.preflight import preflight
from offpolicy.runtime.run_dir import prepare_run_dir, reopen_run_dir, weights_dir, write_config
from offpolicy.runtime.serial_roles import SerialRoles


def train(cfg: Config, log=print, resume: tuple[Path, dict] | None = None) -> dict:
    """Run `offpolicy train`: build/load the base model, start roles, train, write the run
    folder. `resume` = (checkpoint folder, its driver state) from `checkpoint.latest`: continue
    that run in its own folder from the checkpoint's step."""
    t_start = time.perf_counter()
    startup = Startup()
    plan = RunPlan.of(cfg)
    run_dir = prepare_run_dir(cfg) if resume is None else reopen_run_dir(cfg, resume[1]["step"])
    log(f"run folder: {run_dir}")
    model_path = _base_model(cfg, plan, run_dir, resume, log)
    startup.mark("base model")
    # This process's threads from here on: the serial layout's roles share it; with Ray the
    # driver only coordinates.
    setup_process(plan.learner_threads if cfg.resources.serial else 1)
    driver_cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    summary = {"run_dir": str(run_dir), "model_path": model_path, "interrupted": False,
               "base_model_build": build_info(model_path), "machine": environment_info()}
    restore = signal.signal(signal.SIGTERM, _raise_interrupt)
    session = None
    try:
        stream = resume[1]["step"] if resume else 0  # a resumed run draws prompts afresh
        session = _start_session(cfg, plan, model_path, stream, summary, log)
        startup.roles(session.startup())
        _drive(cfg, plan, session, run_dir, summary, resume, t_start, log, startup)
    except KeyboardInterrupt:
        summary["interrupted"] = True
        log("interrupted: stopping all roles")
    except ConfigError:
        raise
    except Exception as e:  # a role failed: say so in one line and how to continue
        summary["error"] = one_line(e)
        newest = checkpoints(run_dir)
        hint = (f"resume from {newest[-1].name} with `offpolicy train --resume {run_dir}`"
                if newest else "no checkpoint was written yet (checkpoint.every)")
        raise RuntimeError(f"run failed: {summary['error']}; {hint}") from e
    finally:
        signal.signal(signal.SIGTERM, restore)
        if session is not None:
            session.close()
        if driver_cores is not None:  # resources.pin_cpus may have pinned this process
            os.sched_setaffinity(0, driver_cores)
        shutil.rmtree(weights_dir(cfg), ignore_errors=True)  # FileSync's working copies
        summary["wall_s"] = time.perf_counter() - t_start
        summary["startup_s"] = startup.seconds
        write_summary(run_dir, summary)
    return summary


def _drive(cfg: Config, plan: RunPlan, session: Layout, run_dir: Path, summary: dict, resume,
           t_start: float, log, startup: Startup) -> None:
    """The run on started roles, into `summary`: the resumed state, the actors' start, the
    base eval, the steps (metrics written as they come), the final policy and the ledger."""
    first = resume[1]["step"] + 1 if resume else 1
    if resume:
        summary["resumed_from"] = session.load_state(resume[0])
        log(f"resumed from {resume[0]}: learner version {summary['resumed_from']}")
    session.start()
    if cfg.eval.base == "start":
        _base_eval(session, "", summary, log)
        startup.mark("base eval")
    writer = MetricsWriter(run_dir, cfg.learner.steps, cfg.log.progress_every_s,
                           backends=make_backends(cfg, run_dir))
    try:
        t_loop = time.perf_counter()
        summary.update(_train_loop(cfg, plan, session, writer, t_start, run_dir, first,
                                   resume[1]["totals"] if resume else None,
                                   startup, log))
        summary["train_s"] = time.perf_counter() - t_loop
        if cfg.eval.base == "end":
            _base_eval(session, summary["model_path"], summary, log)
    finally:
        writer.close()
    summary["buffer"], summary["actors"], summary["ledger"] = session.finish(
        run_dir / "checkpoints" / "final")
    log(describe_ledger(summary["ledger"]))
    summary["memory"] = {
        "learner_peak_rss_mb": summary.get("learner_peak_rss_mb"),
        "actors_peak_rss_mb": [a.get("peak_rss_mb") for a in summary["actors"]]}


def _base_eval(session: Layout, weights: str, summary: dict, log) -> None:
    """The base model's held-out eval: before the first step (the engine still holds it), or
    after the last (`weights`, its folder, loaded back into actor 0's engine)."""
    base = session.evaluate_weights(weights) if weights else session.evaluate()
    summary["base_eval_reward"] = base["eval/reward"]
    log(f"base eval reward {summary['base_eval_reward']:.3f} ({base['eval/seconds']:.0f}s, "
        f"on rollout actor 0{', after the last step' if weights else ''})")


class Startup:
    """Seconds from the command (this process's start) to the end of each start-up phase,
    for the breakdown printed after the first learner step and kept in summary.json."""

    def __init__(self) -> None:
        self.born = process_started_at()
        self.seconds: dict[str, float] = {}
        self.mark("imports")

    def mark(self, phase: str, at: float | None = None) -> None:
        self.seconds[phase] = (at or time.time()) - self.born

    def roles(self, marks: dict) -> None:
        """The layout's marks (`ray`, `learner`, `actors` built), then all roles up."""
        for phase in ("ray", "learner", "actors"):
            if phase in marks:
                self.mark(phase, marks[phase])
        self.mark("roles")

    def first_step(self, metrics: dict) -> str:
        """Marks the first batch's arrival in the learner and the first step's end (from the
        step's own time spans); returns the breakdown line."""
        self.mark("first step")
        self.seconds["first batch"] = self.seconds["first step"] - metrics["time/update_s"]
        s, parts, last = self.seconds, [], 0.0
        for phase in ("imports", "base model", "ray", "roles", "base eval", "first batch",
                      "first step"):
            if phase in s:
                built = (f" (learner at {s['learner']:.1f} s, actors at {s['actors']:.1f} s)"
                         if phase == "roles" else "")
                name = "first update" if phase == "first step" else phase
                parts.append(f"{name} {s[phase] - last:.1f} s{built}")
                last = s[phase]
        return (f"start-up: first learner step done {s['first step']:.1f} s after the command: "
                + ", ".join(parts))


def _base_model(cfg: Config, plan: RunPlan, run_dir: Path, resume, log) -> str:
    """The policy to start from: the checkpoint's on resume, else the base model (built once
    and cached). The KL penalty's reference defaults to the base model, recorded in config."""
    model_path = str(resume[0] / "model") if resume else str(ensure_base_model(cfg, log=log))
    if cfg.loss.kl_coef > 0 and not cfg.loss.kl_reference:
        cfg.loss.kl_reference = str(ensure_base_model(cfg, log=log)) if resume else model_path
        write_config(cfg, run_dir)
    preflight(cfg, model_path, plan)  # chat template, context, memory: before any process
    if cfg.learner.precision == "bf16" and cfg.resources.learner_gpus == 0 and not cpu_bf16():
        log("warning: learner.precision=bf16 on a CPU without AVX512-BF16 or AMX: torch emulates "
            "bf16 there, so the step may be slower than fp32 (measure both)")
    return model_path


def _start_session(cfg: Config, plan: RunPlan, model_path: str, stream: int, summary: dict,
                   log) -> Layout:
    """The roles, in this process (`resources.serial`: no Ray is imported) or as Ray actors."""
    if cfg.resources.serial:
        session = SerialRoles(cfg, plan, model_path, stream)
    else:
        from offpolicy.runtime.ray_roles import RayRoles  # imports Ray: only when asked for

        session = RayRoles(cfg, plan, model_path, log, stream)
        summary["cluster"], summary["placement"] = session.cluster, session.nodes
    workers = cfg.resources.learner_workers
    log(f"started {'learner' if workers == 1 else f'{workers} learner workers'}, buffer and "
        f"{cfg.rollout.num_actors} rollout actor(s)"
        f"{' in this process' if cfg.resources.serial else ''}; base model {model_path}")
    return session


def _train_loop(cfg: Config, plan: RunPlan, session: Layout, writer: MetricsWriter,
                t_start: float, run_dir: Path, first: int = 1,
                totals: dict | None = None, startup: Startup | None = None,
                log=print) -> dict:
    """Ask the learner for updates `first`..`learner.steps`; evaluate every `eval.every`; write
    metrics; checkpoint every `checkpoint.every`. Running totals survive a resume (`totals`)."""
    out = totals or {"steps": 0, "samples": 0, "final_eval_reward": None, "staleness_sum": 0.0,
                     "staleness_max": 0}
    for step in range(first, cfg.learner.steps + 1):
        m = session.step()
        if step == first and startup is not None:
            log(startup.first_step(m))
        # Evals run on a rollout engine while the learner goes on; a row carries the newest
        # finished eval and the version it measured. The last one is waited for.
        if step == cfg.learner.steps:
            m.update(session.evaluate())
        else:
            if step % cfg.eval.every == 0:
                session.request_eval()
            done = session.eval_results()
            if done:
                m.update(done[-1])
        if "eval/reward" in m:
            out["final_eval_reward"] = m["eval/reward"]
        m["time/elapsed_s"] = time.perf_counter() - t_start
        writer.write(m)
        out["staleness_sum"] += m["staleness/mean"]
        out["steps"], out["samples"] = step, out["samples"] + m["learner/batch_size"]
        out["samples_per_s"] = m["throughput/samples_per_s"]
        out["learner_peak_rss_mb"] = m["memory/learner_peak_rss_mb"]
        out["staleness_max"] = max(out["staleness_max"], m["staleness/max"])
        every = plan.checkpoint_every
        if every and step % every == 0 and step < cfg.learner.steps:
            folder = staging(run_dir, step)  # complete, or invisible: see checkpoint.py
            session.save_state(folder, cfg.checkpoint.buffer)
            commit(folder, {"step": step, "totals": out}, cfg.checkpoint.keep)
    out["staleness_mean"] = out["staleness_sum"] / max(out["steps"], 1)
    return out


def describe_ledger(ledger: dict) -> str:
    """One line: where the run's episodes went, and whether every one is accounted for.
    Episodes of several segments arrive as several rows; the rows' fates are then given
    apart from the episodes'."""
    rows = ", ".join(f"{k} {ledger[k]}" for k in (
        "retired", "filtered", "evicted_staleness", "evicted_capacity", "evicted_surplus",
        "in_buffer") if ledger[k])
    lost = ", ".join(f"{k} {ledger[k]}" for k in ("env_errors", "lost", "unfinished")
                     if ledger[k])
    if ledger["balanced"]:
        if ledger["added"] == ledger["episodes"]:
            fates = ", ".join(x for x in (rows, lost) if x)
            return f"ledger: {ledger['admitted']} episodes: {fates}; all accounted for"
        return (f"ledger: {ledger['admitted']} episodes ({ledger['episodes']} arrived"
                f"{', ' + lost if lost else ''}) in {ledger['added']} rows: {rows}; "
                "all accounted for")
    return (f"error: ledger does not balance: {ledger}; some trajectories went uncounted "
            "(please report this)")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
