"""Episodes of many calls: segments as rows and their weight, episode-level advantages, the
long task, episode functions, the continuous actor, batches sized in rows, resume with
episodes in flight, and the bad input of long episodes."""

import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from offpolicy.actors.rollout import BatchResult, RolloutActor
from offpolicy.algorithms.advantages import ADVANTAGES, GroupAdvantage, episode_advantages
from offpolicy.algorithms.losses import LOSSES, LossInputs
from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.config.plan import RunPlan
from offpolicy.core.types import Batch, Segments, Trajectory
from offpolicy.envs import ENVS, make_env
from offpolicy.envs.function import register_episode
from offpolicy.runtime.layout import buffer_arguments
from offpolicy.weights.sync import LocalSync

from conftest import fast_config

# Losses whose every token's term depends on that token alone (and the batch's token count):
# an episode split into rows leaves their loss and gradient exactly as they were.
TOKEN_LOCAL = ["pg", "tis", "ppo_clip", "icepop", "cispo", "m2po", "decoupled_ppo", "asymre"]
ROW_MEAN = ["gspo", "oapl", "vcpo"]


def _inputs(rows: list[int], weights=None, seed: int = 0, first_episode: int = 0):
    """LossInputs for rows of the given token counts (padded to the longest), the tokens
    drawn once from `seed` and laid out in order: the same tokens whatever the split. The
    first `first_episode` tokens (episode A) have advantage 1, the others -1."""
    g = torch.Generator().manual_seed(seed)
    total = sum(rows)
    lp_all = -torch.rand(total, generator=g) - 0.1
    mu_all = lp_all + 0.3 * torch.randn(total, generator=g)
    first_episode = first_episode or rows[0]
    adv_all = torch.tensor([1.0] * first_episode + [-1.0] * (total - first_episode))
    T, starts = max(rows), np.cumsum([0] + rows)
    lp = torch.zeros(len(rows), T)
    mu, adv, mask = torch.zeros_like(lp), torch.zeros_like(lp), torch.zeros_like(lp)
    for i, (s, n) in enumerate(zip(starts, rows)):
        lp[i, :n], mu[i, :n], adv[i, :n], mask[i, :n] = lp_all[s:s + n], mu_all[s:s + n], \
            adv_all[s:s + n], 1.0
    lp.requires_grad_(True)
    return LossInputs(logprobs=lp, behavior_logprobs=mu, advantages=adv, mask=mask,
                      row_weights=None if weights is None else torch.tensor(weights)), lp


def _token_grads(lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return lp.grad[mask.bool()]


@pytest.mark.parametrize("name", TOKEN_LOCAL)
def test_a_token_mean_loss_weighs_an_episode_the_same_split_into_segments(name):
    """Episode A (6 tokens) beside episode B (4): as one row, then split into 3 segment rows
    of 2 tokens each. Loss and every token's gradient are unchanged."""
    whole, lp1 = _inputs([6, 4], first_episode=6)
    split, lp2 = _inputs([2, 2, 2, 4], first_episode=6)
    loss1, _ = LOSSES[name](whole)
    loss2, _ = LOSSES[name](split)
    loss1.backward()
    loss2.backward()
    assert torch.allclose(loss1, loss2, atol=1e-6)
    assert torch.allclose(_token_grads(lp1, whole.mask), _token_grads(lp2, split.mask),
                          atol=1e-6)


@pytest.mark.parametrize("name", ROW_MEAN)
def test_a_row_mean_loss_weighs_an_episode_the_same_in_n_segments(name):
    """A loss that averages over rows: episode A as 1 row, then as 3 identical segments each
    weighted 1/3 (`Batch.row_weights`), beside episode B: the same loss and the same total
    gradient on A's tokens."""
    one, lp1 = _inputs([4, 4], weights=[1.0, 1.0])
    three = LossInputs(
        logprobs=one.logprobs.detach()[[0, 0, 0, 1]].clone().requires_grad_(True),
        behavior_logprobs=one.behavior_logprobs[[0, 0, 0, 1]],
        advantages=one.advantages[[0, 0, 0, 1]], mask=one.mask[[0, 0, 0, 1]],
        row_weights=torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    loss1, _ = LOSSES[name](one)
    loss3, _ = LOSSES[name](three)
    loss1.backward()
    loss3.backward()
    assert torch.allclose(loss1, loss3, atol=1e-6)
    assert torch.allclose(lp1.grad[0], three.logprobs.grad[:3].sum(0), atol=1e-6)
    assert torch.allclose(lp1.grad[1], three.logprobs.grad[3], atol=1e-6)


def _row(episode: str, group: str, segment: int, segments: int, reward: float,
         tokens: int = 3) -> Trajectory:
    return Trajectory(f"{episode}/{segment}", group, np.array([1, 2], np.int32),
                      np.arange(tokens, dtype=np.int32), np.ones(tokens, np.int8),
                      np.zeros(tokens, np.float32), np.zeros(tokens, np.int32), reward, "x",
                      "stop", episode_id=episode, segment=segment, segments=segments)


def test_row_weights_sum_to_one_per_episode_and_advantages_compare_episodes():
    """Episode A (3 segments, reward 1) and B (1 segment, reward 0) of one group: GRPO over
    the two episodes gives +1 and -1 whatever A's number of rows (over rows it would be
    3 : 1, a mean of 0.75)."""
    batch = Batch([_row("a", "g", i, 3, 1.0) for i in range(3)] + [_row("b", "g", 0, 1, 0.0)],
                  version=0)
    weights = batch.row_weights()
    assert weights[:3].sum() == pytest.approx(1.0) and weights[3] == 1.0
    rows, rewards, groups = batch.episodes()
    assert rows.tolist() == [0, 0, 0, 1] and rewards.tolist() == [1.0, 0.0]
    adv = episode_advantages(ADVANTAGES["grpo"], rows, rewards, groups)
    assert adv.tolist() == pytest.approx([1.0, 1.0, 1.0, -1.0], abs=1e-4)


def test_segments_pack_rows_and_give_them_back():
    rows = [_row("e", "g", i, 5, 0.5, tokens=i + 1) for i in range(5)]
    packed = Segments.of(rows)
    assert len(packed) == 5 and packed.tokens() == sum(t.num_tokens for t in rows)
    # about the tokens' bytes, not a Python object per row
    assert packed.nbytes < sum(t.nbytes for t in rows) / 2
    back = packed.rows(1, 4)
    assert [t.segment for t in back] == [1, 2, 3]
    assert all(np.array_equal(a.completion_ids, b.completion_ids) and a.id == b.id
               for a, b in zip(back, rows[1:4]))


def test_held_segments_are_joined_in_runs_and_come_back_in_order():
    from offpolicy.buffer.pending import JOIN, PendingSegments

    rows = [_row("e", "g", i, 0, 0.0, tokens=1 + i % 3) for i in range(2 * JOIN + 5)]
    held = PendingSegments()
    for i, r in enumerate(rows):
        held.add([Segments.of([r])])
    assert len(held.by_episode["e"]) == 2 + 5  # two runs of JOIN joined, five loose
    assert held.rows == len(rows) and held.nbytes == sum(c.nbytes for c in held.by_episode["e"])
    back = [t for c in held.pop("e") for t in c.rows()]
    assert [t.segment for t in back] == list(range(len(rows)))
    assert all(np.array_equal(a.completion_ids, b.completion_ids) and
               np.array_equal(a.prompt_ids, b.prompt_ids) for a, b in zip(back, rows))
    assert held.rows == held.nbytes == 0


def test_a_group_bigger_than_the_capacity_is_held_alone_not_lost():
    """buffer.capacity bounds the backlog: the oldest groups go (counted), never the newest,
    so a group of long episodes with more rows than the capacity is still trained."""
    from offpolicy.buffer.rows import RowStore

    store = RowStore(batch_rows=4, max_staleness=4, capacity=10,
                     advantage=GroupAdvantage(ADVANTAGES["dr_grpo"]))

    def group(name: str, segments: int) -> list[Segments]:
        return [Segments.of([_row(f"{name}{k}", name, i, segments, float(k)) for i in
                             range(segments)]) for k in range(2)]

    store.add(group("a", 3))
    store.fit_capacity()
    store.add(group("b", 12))  # 24 rows, over a capacity of 10
    store.fit_capacity()
    assert store.size == 24 and store.fates["evicted_capacity"] == 6  # group a went, b stays
    store.add(group("c", 1))
    store.fit_capacity()
    assert store.size == 2 and store.fates["evicted_capacity"] == 30


# -- the long task --------------------------------------------------------------------------


def test_long_addition_terminal_and_dense_rewards_and_its_own_carry():
    env = make_env("long_addition", calls=3)
    env.reset(7)
    answers = []
    for _ in range(3):
        answers.append(env.answer())
        obs, reward, done, info = env.step(answers[-1])
    assert done and reward == 1.0 and info == {"calls_right": 3, "calls": 3, "proxy": 1.0}
    env.reset(7)
    _, r, _, info = env.step("999")  # wrong, and its carry 9 is not 0/1: the next call gets 0
    assert r == 0.0 and env.carry == 0 and info == {"proxy": 0.0}
    dense = make_env("long_addition", calls=4, reward="dense")
    dense.reset(1)
    total = sum(dense.step(dense.answer() if i % 2 else "x")[1] for i in range(4))
    assert total == pytest.approx(0.5)  # the fraction of calls right


def test_long_addition_lengths_eval_split_and_snapshots():
    env = make_env("long_addition", calls=16, calls_max=1024)
    lengths = [env.reset(s) and env.length for s in range(200)]
    assert 16 <= min(lengths) and max(lengths) <= 1024 and np.median(lengths) < 300  # heavy tail
    train, held_out = make_env("long_addition", calls=2), make_env("long_addition", "eval",
                                                                  calls=2)
    assert train.reset(3) != held_out.reset(3)  # eval tasks have a namespace of their own
    train.reset(5)
    train.step(train.answer())
    state = train.snapshot()
    again = make_env("long_addition", calls=2)
    assert again.restore(state) == train._context()
    assert again.step(again.answer()) == train.step(train.answer())


# -- episode functions and the continuous actor ----------------------------------------------


def _count(policy, seed, split="train", fail=False, hang=0.0):
    """An episode function: as many calls as its task says, reward 1 for each answer that is
    text at all, divided by the calls."""
    n = random.Random(seed).randint(1, 6)
    good = 0
    for i in range(n):
        if fail and i == 1:
            raise ValueError("this episode's tool failed")
        time.sleep(hang)
        good += bool(policy(f"{i}+1="))
    return good / n, {"calls": n}


@pytest.fixture
def episodes_env():
    register_episode("count", _count)
    yield "count"
    ENVS.pop("count", None)


def _actor(model_dir, *overrides, batch_rows=0):
    cfg = fast_config(model_dir, *overrides, f"learner.batch_rows={batch_rows}",
                      "buffer.max_staleness=100")
    buf = ReplayBuffer(**buffer_arguments(cfg, RunPlan.of(cfg)))
    return RolloutActor(cfg, 0, str(model_dir), buf, LocalSync()), buf


def test_an_episode_function_is_a_segment_per_call_and_a_failing_one_is_contained(
        model_dir, episodes_env, tmp_path):
    actor, buf = _actor(model_dir, "env.name=count", "rollout.group_size=2",
                        "rollout.concurrent_episodes=4", "rollout.failure_cost=episode",
                        f"run.dir={tmp_path}", "env.max_turns=100")
    while actor.counts["episodes"] < 8:
        actor.advance(timeout=0)
    rows = [t for g in buf.store.entries.values() for t in g.group]
    by_episode = {}
    for t in rows:
        by_episode.setdefault(t.episode, []).append(t)
    assert all(len(r) == r[0].segments and [t.segment for t in r] == list(range(len(r)))
               for r in by_episode.values())
    assert buf.ledger()["balanced"]
    # an episode that raises: counted, its traceback kept, the rest of its group trains
    ENVS.register("count", lambda split="train", eval_size=0, **kw: __import__(
        "offpolicy.envs.function", fromlist=["FunctionEnv"]).FunctionEnv(
            lambda policy, seed, split: _count(policy, seed, split, fail=seed % 2 == 0)))
    actor, buf = _actor(model_dir, "env.name=count", "rollout.group_size=2",
                        "rollout.concurrent_episodes=4", "rollout.failure_cost=episode",
                        f"run.dir={tmp_path}", "env.max_turns=100")
    for _ in range(40):
        actor.advance(timeout=0)
    assert actor.counts["env_errors"] > 0
    assert "this episode's tool failed" in (tmp_path / "env_errors.log").read_text()
    assert buf.ledger()["balanced"]


def test_the_continuous_actor_refills_free_slots_and_sends_each_group_when_done(model_dir):
    """Heavy-tailed lengths (1 to 64 calls): every engine call carries every episode waiting
    for the policy, slots refill at once, so occupancy stays near 1 where the batch loop
    waits for its slowest episode."""
    over = ["env.name=long_addition", "env.kwargs.calls=1", "env.kwargs.calls_max=64",
            "rollout.group_size=2", "rollout.concurrent_episodes=16", "env.max_turns=100",
            "rollout.prompts_per_batch=8"]
    actor, buf = _actor(model_dir, *over, batch_rows=64)
    sizes = []
    real = actor.engine.generate

    def generate(prompts, *a, **k):
        sizes.append(len(prompts))
        return real(prompts, *a, **k)
    actor.engine.generate = generate
    results = [actor.advance(timeout=0) for _ in range(150)]
    assert max(sizes) <= 16 and np.mean(sizes) > 0.9 * 16
    assert results.count(BatchResult.ADDED) > 10  # groups go as they finish, not in waves
    occupancy = actor.counts["occupancy"] / actor.counts["engine_calls"]
    batch_actor, _ = _actor(model_dir, *over, "rollout.mode=batch", batch_rows=64)
    calls = 0
    while calls < 150 and batch_actor.one_batch(timeout=0) is BatchResult.ADDED:
        calls = batch_actor.counts["engine_calls"]
    batch_occupancy = batch_actor.counts["occupancy"] / batch_actor.counts["engine_calls"]
    assert occupancy > 0.9 and batch_occupancy < 0.6 * occupancy
    assert buf.ledger()["balanced"]


def test_an_actor_with_every_slot_busy_stops_when_the_run_ends(model_dir):
    """Admission is not asked while no slot is free, so the actor asks the buffer whether the
    run is over: the end of a run does not wait for its longest episode."""
    actor, buf = _actor(model_dir, "env.name=long_addition", "env.kwargs.calls=100000",
                        "rollout.group_size=2", "rollout.concurrent_episodes=2",
                        "env.max_turns=1000000")
    for _ in range(3):
        assert actor.advance(timeout=0) is BatchResult.ADVANCED
    buf.close()
    start = time.perf_counter()
    while actor.advance(timeout=0) is not BatchResult.STOP:
        assert time.perf_counter() - start < 5
    assert len(actor.live) == 2  # stopped with its episodes in flight (the ledger: unfinished)


def test_row_mode_hands_out_rows_with_their_episode_advantage(model_dir):
    actor, buf = _actor(model_dir, "env.name=long_addition", "env.kwargs.calls=12",
                        "rollout.group_size=2", "rollout.concurrent_episodes=4",
                        "env.max_turns=100", batch_rows=10)
    while buf.store.size < 40:
        actor.advance(timeout=0)
    batch = buf.sample(0, timeout=0)
    assert len(batch) == 10 and batch.given_advantages() is not None
    seen = [t for v in (1, 2, 3) for t in buf.sample(v, timeout=0).trajectories]
    assert len({(t.episode, t.segment) for t in batch.trajectories + seen}) == 40  # each once
    assert buf.ledger()["balanced"]


# -- resume ----------------------------------------------------------------------------------


def test_episodes_in_flight_go_on_from_their_last_segment_after_a_restore(model_dir, tmp_path):
    over = ["env.name=long_addition", "env.kwargs.calls=30", "rollout.group_size=2",
            "rollout.concurrent_episodes=4", "env.max_turns=100"]
    actor, buf = _actor(model_dir, *over, batch_rows=10)
    for _ in range(12):
        actor.advance(timeout=0)
    actor._flush(force=True)
    at = {ep.id: ep.calls for g in actor.groups.values() for ep in g.episodes}
    assert len(at) == 4 and all(0 < c < 30 for c in at.values())
    actor.snapshot_to(tmp_path / "actor0.pkl")
    snap = buf.snapshot()

    again, buf2 = _actor(model_dir, *over, batch_rows=10)
    buf2.restore(snap)
    again.restore(str(tmp_path / "actor0.pkl"))
    buf2.settle_restore()
    assert again.counts["episodes_resumed"] == 4
    assert {ep.id: ep.calls for g in again.groups.values() for ep in g.episodes} == at
    while again.groups:
        again.advance(timeout=0)
    rows = [t for v in range(12) for t in buf2.sample(v, timeout=0).trajectories]
    segments = {}
    for t in rows:
        segments.setdefault(t.episode, []).append(t.segment)
    assert all(sorted(s) == list(range(30)) for s in segments.values())  # none lost, none twice
    ledger = buf2.ledger()
    assert ledger["balanced"] and ledger["lost"] == 0 and ledger["episodes"] == 4


def test_episodes_without_a_snapshot_restart_with_their_group(model_dir, episodes_env,
                                                              tmp_path):
    actor, buf = _actor(model_dir, "env.name=count", "rollout.group_size=2",
                        "rollout.concurrent_episodes=2", "env.max_turns=100")
    while not any(ep.calls for g in actor.groups.values() for ep in g.episodes):
        actor.advance(timeout=0)
    actor.snapshot_to(tmp_path / "actor0.pkl")
    snap = buf.snapshot()
    again, buf2 = _actor(model_dir, "env.name=count", "rollout.group_size=2",
                         "rollout.concurrent_episodes=2", "env.max_turns=100")
    buf2.restore(snap)
    again.restore(str(tmp_path / "actor0.pkl"))
    buf2.settle_restore()
    assert again.counts["episodes_restarted"] == 2
    assert all(ep.calls == 0 for g in again.groups.values() for ep in g.episodes)
    while again.groups:
        again.advance(timeout=0)
    assert buf2.ledger()["balanced"] and buf2.ledger()["lost"] == 0


# -- bad input -------------------------------------------------------------------------------


class _Growing:
    """A conversation whose every observation is long: it outgrows any context."""

    def __init__(self, split="train", eval_size=0):
        pass

    def reset(self, seed):
        return "1+1="

    def step(self, text):
        return "9" * 40, 0.0, False, {}


def test_a_context_that_outgrows_the_model_and_an_endless_episode_are_cut_and_counted(
        model_dir):
    ENVS.register("growing", _Growing)
    try:
        actor, buf = _actor(model_dir, "env.name=growing", "rollout.group_size=2",
                            "rollout.concurrent_episodes=2", "env.max_turns=1000")
        for _ in range(20):
            actor.advance(timeout=0)
        # every episode reaches the tiny model's 256 positions within 20 calls
        assert actor.counts["context_cuts"] >= 2 and actor.counts["episodes"] >= 2
        assert buf.ledger()["balanced"]
        rows = [t for g in buf.store.entries.values() for t in g.group]
        assert {t.finish_reason for t in rows} == {"context"}
        actor, _ = _actor(model_dir, "env.name=growing", "rollout.group_size=2",
                          "rollout.concurrent_episodes=2", "env.max_turns=3")
        for _ in range(5):
            actor.advance(timeout=0)
        assert actor.counts["episodes_capped"] == 2
    finally:
        ENVS.pop("growing", None)


def test_the_first_failure_is_printed_with_its_traceback(model_dir, episodes_env, capfd):
    ENVS.register("count", lambda split="train", eval_size=0, **kw: __import__(
        "offpolicy.envs.function", fromlist=["FunctionEnv"]).FunctionEnv(
            lambda policy, seed, split: _count(policy, seed, split, fail=True)))
    actor, buf = _actor(model_dir, "env.name=count", "rollout.group_size=2",
                        "rollout.concurrent_episodes=2", "env.max_turns=100")
    for _ in range(10):
        actor.advance(timeout=0)
    err = capfd.readouterr().err
    assert "an environment step raised" in err and "this episode's tool failed" in err
    assert err.count("Traceback") == 1  # the first only; then a rate every 30 s
    # every episode of a failing task raises: each group is dropped whole (failure_cost group)
    assert buf.ledger()["env_errors"] == actor.counts["env_errors"]
    assert math.isfinite(actor.counts["occupancy"])


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_run_resumes_its_episodes_in_flight(model_dir, tmp_path):
    """kill -9 of the whole run with long episodes in flight, then `--resume`: the episodes the
    checkpoint held go on from their last segment and the ledger balances."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from offpolicy.runtime.checkpoint import checkpoints
    from test_ray_loop import ray_processes

    run_dir, before = tmp_path / "run", ray_processes()
    args = [f"model.path={model_dir}", "env.kwargs.calls=300", "env.kwargs.calls_max=0",
            "env.max_turns=1000", "env.eval_size=4", "rollout.group_size=2",
            "rollout.concurrent_episodes=4", "learner.batch_rows=32", "learner.steps=30",
            "buffer.max_staleness=100", "checkpoint.every=5", "eval.every=100",
            "log.progress_every_s=0", "resources.actor_cpus=0.5", "resources.learner_cpus=0.5"]
    config = str(Path(__file__).resolve().parents[1] / "configs" / "long_addition.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "offpolicy.tools.cli", "train", config, *args,
                             f"run.dir={run_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("step   12/30"):
            break
    proc.kill()
    proc.wait()
    for pid in ray_processes() - before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    held = checkpoints(run_dir)[-1] / "actors" / "actor0.pkl"
    assert held.is_file()
    out = subprocess.run([sys.executable, "-m", "offpolicy.tools.cli", "train", "--resume",
                          str(run_dir)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["actors"][0]["episodes_resumed"] > 0
    assert summary["ledger"]["balanced"] and summary["ledger"]["lost"] == 0, summary["ledger"]
    from offpolicy.tools.report import report

    assert "episodes.png" in report(run_dir).read_text()  # staleness by segment, lengths
    assert (run_dir / "episodes.png").stat().st_size > 0
