"""Faults and the ledger: every episode is accounted for (added, dropped by its actor, lost with a
dead actor, filtered, trained on, evicted or still stored); a NaN step is skipped and counted;
a rollout actor killed mid-run is restarted by Ray and the run finishes."""

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from offpolicy.actors.rollout import RolloutActor
from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.runtime.validate import load_config
from offpolicy.runtime.launch import train
from offpolicy.learner.learner import Learner
from offpolicy.core.types import Batch, Incarnation
from offpolicy.weights.sync import LocalSync, cpu_state

from conftest import QUICKSTART, OneBatch, fast_config
from test_ray_loop import read_metrics
from test_replay import group, mixed


def test_ledger_counts_a_dead_actors_batch_as_lost_and_balances():
    buf = ReplayBuffer(2, max_staleness=100, capacity=10_000, drop_uniform_groups=True,
                       group_size=4)
    assert buf.admit(0, 3, timeout=0, actor=Incarnation(0, "a")).admitted
    buf.add([mixed("a1"), mixed("a2"), group("a3", [1, 1, 1, 1])], reserved=3, actor=Incarnation(0, "a"),
            report={"trajectories": 12})
    assert buf.admit(0, 2, timeout=0, actor=Incarnation(1, "a")).admitted
    # an environment failed in one of the two groups: the actor dropped that group
    buf.add([mixed("b1")], reserved=2, actor=Incarnation(1, "a"), report={"trajectories": 4})
    assert buf.admit(0, 2, timeout=0, actor=Incarnation(0, "a")).admitted  # actor 0 generates 2 groups...
    assert buf.reserved == 2
    # ...and dies. Ray restarts it: the new incarnation's first call reveals the lost batch.
    assert buf.admit(0, 1, timeout=0, actor=Incarnation(0, "b")).admitted
    assert buf.reserved == 1  # the dead batch's reservation is released
    assert len(buf.sample(0)) == 8  # a1 and a2 trained on
    ledger = buf.ledger()
    expected = {"admitted": 32, "episodes": 16, "added": 16, "env_errors": 4, "lost": 8,
                "unfinished": 0, "in_flight": 4, "filtered": 4, "retired": 8,
                "evicted_staleness": 0, "evicted_capacity": 0, "evicted_surplus": 0,
                "in_buffer": 4, "actors_reported": 16, "balanced": True}
    assert {k: ledger[k] for k in expected} == expected
    # at the end every actor has stopped: what is still owed was in flight when the run ended
    final = buf.ledger(final=True)
    assert (final["lost"], final["unfinished"], final["in_flight"], final["balanced"]) == (
        8, 4, 0, True)
    buf.counts["added"] += 4  # a group counted on arrival but never stored: caught
    assert not buf.ledger()["balanced"]


def test_lag_mode_reissues_the_work_order_of_a_dead_actor():
    buf = ReplayBuffer(2, max_staleness=0, capacity=1000, lag=0, group_size=2)
    order = buf.admit(0, 2, timeout=0, actor=Incarnation(0, "a"))
    assert order.admitted and (order.version, order.n_groups) == (0, 2)
    assert not buf.admit(0, 2, timeout=0, actor=Incarnation(1, "a")).admitted  # all on order already
    order = buf.admit(0, 2, timeout=0, actor=Incarnation(0, "b"))  # actor 0 died and came back
    assert order.admitted and (order.version, order.n_groups) == (0, 2)
    assert buf.ledger()["lost"] == 4


def test_a_nonfinite_loss_skips_the_step_and_counts_it(model_dir):
    cfg = fast_config(model_dir, "engine.logprob_check_every=0")
    actor = RolloutActor(cfg, 0, str(model_dir), None, LocalSync())

    def batch(poison: bool) -> Batch:
        groups = actor.rollout_batch()
        for g in groups:  # the random model never answers right: give each group some signal
            g[0].reward = 1.0
        if poison:
            groups[0][0].behavior_logprobs[:] = np.nan
        return Batch([t for g in groups for t in g], 0)

    source = OneBatch(batch(poison=True))
    learner = Learner(cfg, str(model_dir), source, LocalSync())
    before = cpu_state(learner.model)
    m = learner.step()
    assert m["learner/nonfinite_skipped"] == 1 and learner.version == 1
    assert all(torch.equal(v, before[k]) for k, v in cpu_state(learner.model).items())
    source.batch = batch(poison=False)
    m = learner.step()  # the next good batch trains as usual
    assert m["learner/nonfinite_skipped"] == 1 and learner.version == 2
    assert any(not torch.equal(v, before[k]) for k, v in cpu_state(learner.model).items())


def _pids_of(title: str) -> list[int]:
    """This test's descendant processes (its Ray's workers, not another run's on the same
    machine) whose command line holds `title` (Ray names actor processes ray::<Class>)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True,
                         text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    parent = {int(r[0]): int(r[1]) for r in rows}

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False
    return [int(r[0]) for r in rows if len(r) == 3 and title in r[2] and mine(int(r[0]))]


def _kill_when(ready, title: str, first_only: bool = False) -> list[int]:
    """A background thread SIGKILLs the processes titled `title` (or the first of them) once
    `ready()` holds and one exists; returns the list it fills with the pids it killed."""
    killed = []

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            pids = _pids_of(title) if ready() else []
            if pids:
                for pid in pids[:1] if first_only else pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def _metric_lines(run_dir) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


@pytest.mark.ray
def test_a_killed_rollout_actor_is_restarted_and_the_ledger_balances(base_model, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(QUICKSTART, [
        f"model.path={base_model}", f"run.dir={run_dir}", "learner.steps=60",
        "learner.batch_groups=4", "rollout.prompts_per_batch=8", "rollout.num_actors=2",
        "resources.actor_cpus=0.5", "resources.learner_cpus=0.5", "buffer.max_staleness=4",
        "eval.every=60", "env.eval_size=32"])
    killed = _kill_when(lambda: _metric_lines(run_dir) >= 3, "ray::RolloutActor",
                        first_only=True)
    logs = []
    summary = train(cfg, log=logs.append)
    assert killed, "no rollout actor process was found to kill"
    assert summary["steps"] == 60 and not summary["interrupted"]
    assert sum(a["restarts"] for a in summary["actors"]) == 1
    assert any("rollout actor" in line and "restarted it (1/3)" in line for line in logs)
    ledger = summary["ledger"]
    assert ledger["balanced"], ledger
    assert ledger["lost"] in (0, 8 * 8)  # killed while generating a batch, or while held off
    assert ledger["in_flight"] == 0
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
    print(f"\nkilled actor pid {killed[0]}; ledger {ledger}")


@pytest.mark.ray
def test_an_actor_that_dies_past_max_restarts_ends_the_run_in_one_line(base_model, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(QUICKSTART, [
        f"model.path={base_model}", f"run.dir={run_dir}", "learner.steps=500",
        "learner.batch_groups=4", "rollout.prompts_per_batch=8", "rollout.max_restarts=0",
        "eval.every=500", "env.eval_size=32", "checkpoint.every=0"])

    _kill_when(lambda: _metric_lines(run_dir) >= 3, "ray::RolloutActor")
    with pytest.raises(RuntimeError, match=r"^run failed: RuntimeError: rollout actor 0 died and "
                                           r"Ray did not restart it \(restarted 0 of "
                                           r"rollout.max_restarts=0 times\)"):
        train(cfg, log=lambda *a: None)
    assert "rollout actor 0 died" in json.loads((run_dir / "summary.json").read_text())["error"]


def _checkpoint(run_dir, learner, step, keep=2):
    from offpolicy.runtime.checkpoint import commit, staging

    folder = staging(run_dir, step)
    learner.save_state(str(folder))
    return commit(folder, {"step": step, "totals": {}}, keep)


def test_checkpoints_are_atomic_kept_and_checked_on_resume(model_dir, tmp_path, capsys):
    from offpolicy.runtime.checkpoint import checkpoints, latest
    from offpolicy.tools.cli import main
    from offpolicy.core.errors import ConfigError

    cfg = fast_config(model_dir, "engine.logprob_check_every=0")
    (tmp_path / "config.yaml").write_text("{}")
    learner = Learner(cfg, str(model_dir), OneBatch(None), LocalSync())
    learner.version = 3
    for step in (1, 2, 3):
        _checkpoint(tmp_path, learner, step)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000002", "step-000003"]  # keep 2
    (tmp_path / "checkpoints" / "step-000004.tmp").mkdir()  # a crash mid-write: ignored
    ck, state = latest(tmp_path)
    assert ck.name == "step-000003" and state["step"] == 3

    resumed = Learner(cfg, str(ck / "model"), OneBatch(None), LocalSync())
    assert resumed.load_state(str(ck)) == 3 and resumed.version == 3
    assert resumed.opt.state_dict()["param_groups"] == learner.opt.state_dict()["param_groups"]

    damage = {  # what each damaged file gets: one line naming it
        "learner.pt": (lambda p: p.write_bytes(p.read_bytes()[:100]), "corrupt: learner.pt"),
        "model/model.safetensors": (lambda p: p.write_bytes(p.read_bytes()[:50]),
                                    "corrupt: model.safetensors"),
        "driver.json": (lambda p: p.write_text("{not json"), "corrupt: driver.json"),
        "model/config.json": (lambda p: p.unlink(), "incomplete: no model/config.json"),
    }
    for name, (spoil, message) in damage.items():
        ck = _checkpoint(tmp_path, learner, 5)
        spoil(ck / name)
        with pytest.raises(ConfigError, match=message):
            latest(tmp_path)
    with pytest.raises(ConfigError, match="has no checkpoint"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.yaml").write_text("{}")
        latest(tmp_path / "empty")
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run folder" in err


@pytest.mark.ray
def test_a_killed_run_resumes_where_its_checkpoint_left_off(base_model, tmp_path):
    import sys

    from offpolicy.runtime.checkpoint import checkpoints, latest
    from test_ray_loop import ray_processes

    run_dir = tmp_path / "run"
    before = ray_processes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "offpolicy.tools.cli", "train", str(QUICKSTART), f"model.path={base_model}",
         f"run.dir={run_dir}", "learner.steps=40", "checkpoint.every=10", "eval.every=10",
         "learner.batch_groups=4", "rollout.prompts_per_batch=8", "env.eval_size=32",
         "log.progress_every_s=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("step   25/40"):
            break
    proc.kill()  # SIGKILL: no clean-up, like a preempted node
    proc.wait()
    for pid in ray_processes() - before:  # the node's Ray processes go down with it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    original = read_metrics(run_dir)
    assert len(original) >= 25 and not (run_dir / "summary.json").exists()
    assert [p.name for p in checkpoints(run_dir)] == ["step-000010", "step-000020"]

    checkpoint = latest(run_dir)
    cfg = load_config(run_dir / "config.yaml", [f"run.dir={run_dir}"])
    summary = train(cfg, log=lambda *a: None, resume=checkpoint)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 41))  # 21-25 of the lost stretch redone
    assert summary["resumed_from"] == 20 and summary["steps"] == 40
    # the resumed run's first eval measured the very weights of step 20 (scored here again
    # in-process; one of the 32 problems may flip between the two greedy implementations)
    from offpolicy.models.loading import load_policy
    from offpolicy.models.tiny import evaluate

    model, tokenizer = load_policy(checkpoint[0] / "model")
    again = evaluate(model, tokenizer, cfg.env, list(range(cfg.env.eval_size)),
                     cfg.engine.max_new_tokens)
    assert abs(summary["base_eval_reward"] - again) <= 1 / 32
    assert all(0 <= m["staleness/min"] <= m["staleness/max"] <= 2 for m in metrics[20:])
    assert summary["ledger"]["balanced"], summary["ledger"]
    # the batch the one actor was generating at the checkpoint, if it was not held off then
    assert summary["ledger"]["lost"] in (0, 8 * 8)
    assert [p.name for p in checkpoints(run_dir)] == ["step-000020", "step-000030"]


def test_a_byte_capacity_below_one_batch_fails_instead_of_stalling():
    buf = ReplayBuffer(8, max_staleness=4, capacity=1000, capacity_bytes=1000)
    with pytest.raises(ValueError, match=r"buffer.capacity_bytes: 1000 bytes cannot hold one "
                                         r"learner batch \(8 groups of about \d+ bytes\)"):
        buf.add([mixed("a")])


@pytest.mark.ray
def test_a_learner_crash_ends_the_run_with_a_resumable_checkpoint(base_model, tmp_path):
    from offpolicy.runtime.checkpoint import latest

    run_dir = tmp_path / "run"
    cfg = load_config(QUICKSTART, [
        f"model.path={base_model}", f"run.dir={run_dir}", "learner.steps=500",
        "checkpoint.every=5", "learner.batch_groups=4", "rollout.prompts_per_batch=8",
        "eval.every=500", "env.eval_size=32"])

    _kill_when((run_dir / "checkpoints" / "step-000005").is_dir, "ray::Learner")
    with pytest.raises(RuntimeError, match=r"^run failed: \w+: .*; resume from step-\d{6} with "
                                           r"`offpolicy train --resume "):
        train(cfg, log=lambda *a: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["error"] and summary["interrupted"] is False
    checkpoint, state = latest(run_dir)  # complete and loadable
    assert state["step"] >= 5 and state["step"] % 5 == 0
