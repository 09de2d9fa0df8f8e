"""Credit along a long episode (`learner.credit`: broadcast, dense, gigpo) against
hand-computed cases, through the row store and from the actor's rows; the length curriculum
(`env.curriculum`); their bad input."""

import math

import numpy as np
import pytest

from offpolicy.algorithms.advantages import ADVANTAGES, GroupAdvantage
from offpolicy.algorithms.credit import Credit, broadcast, dense, gigpo, returns
from offpolicy.buffer.rows import RowStore
from offpolicy.config.schema import CurriculumConfig
from offpolicy.core.errors import ConfigError
from offpolicy.core.types import Segments, Trajectory
from offpolicy.envs.curriculum import Curriculum
from offpolicy.runtime.validate import load_config

EPS = 1e-6


def test_broadcast_gives_every_segment_the_episode_advantage():
    out = broadcast(np.array([0.5, -2.0]), [3, 1])
    assert [a.tolist() for a in out] == [[0.5, 0.5, 0.5], [-2.0]]


def test_dense_mixes_the_proxy_normalised_at_each_call_index():
    # call 0: both right -> 0; call 1: right vs wrong -> +1 / -1 (mean 0.5, std 0.5); call 2:
    # episode 0 alone -> 0. A = 0.5 A_episode + 0.5 A_call.
    out = dense(np.array([1.0, -1.0]), [np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.0])], 0.5)
    np.testing.assert_allclose(out[0], [0.5, 1.0, 0.5], atol=1e-5)
    np.testing.assert_allclose(out[1], [-0.5, -1.0], atol=1e-5)


def test_gigpo_groups_segments_with_the_same_context_across_the_group():
    # Returns with gamma 0.5: episode 0 [0.25, 0.5, 1], episode 1 [0, 0, 0], episode 2
    # [0.5, 1]. Context a holds {0.25, 0, 0.5}: mean 0.25, std sqrt(1/24) -> 0, -1.2247,
    # +1.2247; b holds {0.5, 0}: +1, -1; c holds {1, 1} (std 0): 0; d is seen once: 0.
    np.testing.assert_allclose(returns(np.array([0.0, 0.0, 1.0]), 0.5), [0.25, 0.5, 1.0])
    z = 0.25 / math.sqrt(1 / 24)
    out = gigpo(np.array([1.0, -1.0, 0.5]),
                [np.array([0.0, 0.0, 1.0]), np.zeros(3), np.array([0.0, 1.0])],
                [[b"a", b"b", b"c"], [b"a", b"b", b"d"], [b"a", b"c"]], 0.5, gamma=0.5)
    np.testing.assert_allclose(out[0], [0.5, 1.0, 0.5], atol=1e-5)
    np.testing.assert_allclose(out[1], [-0.5 - 0.5 * z, -1.0, -0.5], atol=1e-5)
    np.testing.assert_allclose(out[2], [0.25 + 0.5 * z, 0.25], atol=1e-5)


def test_with_one_segment_per_episode_every_scheme_is_the_episode_advantage():
    adv = np.array([1.0, -1.0, 0.0])
    scores = [np.array([[r, p]]) for r, p in ((1, 1), (0, 0), (0, 1))]
    for credit in (Credit("broadcast"), Credit("dense", 0.0), Credit("gigpo", 0.0)):
        out = credit(adv, scores, [[b"x"], [b"y"], [b"z"]])
        assert [a.tolist() for a in out] == [[1.0], [-1.0], [0.0]]


def _segments(episode: str, prompts: list[list[int]], reward: float, proxies: list[float],
              first: int = 0, segments: int = 0) -> Segments:
    rows = [Trajectory(f"{episode}/{first + i}", "g", np.array(p, np.int32),
                       np.array([5, 6], np.int32), np.ones(2, np.int8), np.zeros(2, np.float32),
                       np.zeros(2, np.int32), reward, "x", "stop", episode_id=episode,
                       segment=first + i, segments=segments or first + len(prompts),
                       step_reward=reward if first + i == (segments or len(prompts)) - 1
                       else 0.0, proxy=q)
            for i, (p, q) in enumerate(zip(prompts, proxies))]
    return Segments.of(rows)


@pytest.mark.parametrize("name", ["dense", "gigpo"])
def test_the_row_store_gives_each_segment_its_own_advantage(name):
    """An episode arriving in two chunks (held segments, then its last) gets one advantage per
    row, in order, as the hand computation gives."""
    store = RowStore(batch_rows=6, max_staleness=4, capacity=100,
                     advantage=GroupAdvantage(ADVANTAGES["dr_grpo"], credit=Credit(name, 0.5)))
    passed = [_segments("e0", [[1], [2]], 1.0, [1.0, 1.0], segments=3),
              _segments("e0", [[3]], 1.0, [1.0], first=2, segments=3)]
    failed = [_segments("e1", [[1], [2], [4]], 0.0, [1.0, 0.0, 0.0])]
    store.add(passed + failed)
    rows = [t for e in store.take(0, 6)[0] for t in e.group]
    got = {(t.episode, t.segment): t.advantage for t in rows}
    # dr_grpo: +0.5 / -0.5. dense: call 0 agrees (0); calls 1 and 2 differ (+1 / -1).
    # gigpo (terminal reward, gamma 1): contexts [1] and [2] are shared, returns 1 vs 0
    # (+1 / -1); [3] and [4] are seen once (0).
    step = {"dense": [0, 1, 1], "gigpo": [1, 1, 0]}[name]
    for k in range(3):
        assert got[("e0", k)] == pytest.approx(0.25 + 0.5 * step[k], abs=1e-5)
        assert got[("e1", k)] == pytest.approx(-0.25 - 0.5 * step[k], abs=1e-5)


def test_the_actor_records_each_calls_reward_and_proxy(model_dir):
    from test_long_episodes import _actor

    actor, buf = _actor(model_dir, "env.name=long_addition", "env.kwargs.calls=5",
                        "rollout.group_size=2", "rollout.concurrent_episodes=2",
                        "env.max_turns=100", batch_rows=5)
    while buf.store.size < 10:
        actor.advance(timeout=0)
    rows = [t for v in (0, 1) for t in buf.sample(v, timeout=0).trajectories]
    for ep in {t.episode for t in rows}:
        mine = sorted((t for t in rows if t.episode == ep), key=lambda t: t.segment)
        assert len(mine) == 5 and all(t.proxy in (0.0, 1.0) for t in mine)
        # terminal reward: only the last call's step reward is the episode's
        assert [t.step_reward for t in mine] == [0.0] * 4 + [mine[0].reward]
        assert mine[0].reward == float(all(t.proxy == 1.0 for t in mine))


def test_the_curriculum_holds_the_pass_rate_between_its_bounds():
    cur = Curriculum(CurriculumConfig(knob="calls", window=4), top=16)
    assert cur.kwargs() == {"calls": 1}
    cur.record(1, [1, 1, 1, 0])           # 0.75 > 0.7: longer
    assert cur.value == 2 and cur.pass_rate == 0.75
    cur.record(1, [0, 0, 0, 0])           # started at the old length: not counted
    assert cur.value == 2 and cur.seen == 0
    cur.record(2, [1, 0]), cur.record(2, [1, 0])   # 0.5: stays
    assert cur.value == 2 and cur.moves == 1
    for v in (4, 8, 16):
        cur.record(cur.value, [1, 1, 1, 1])
        assert cur.value == v
    cur.record(16, [1, 1, 1, 1])          # at the top: stays
    assert cur.value == 16
    cur.record(16, [0, 0, 0, 1])          # 0.25 < 0.3: shorter
    assert cur.value == 8
    again = Curriculum(CurriculumConfig(knob="calls", window=4), top=16)
    again.restore(cur.state())
    assert again.state() == cur.state()


def test_a_curriculum_run_logs_its_length_and_pass_rate(model_dir, tmp_path):
    """Serial run, long_addition with the curriculum and gigpo: the learner's metrics carry
    `curriculum/value`, `curriculum/pass_rate` and the `is/` diagnostics by segment quarter."""
    import json

    from offpolicy.runtime.launch import train
    from conftest import fast_config

    cfg = fast_config(model_dir, "env.name=long_addition", "env.kwargs.calls=8",
                      "env.curriculum.knob=calls", "env.curriculum.start=4",
                      "env.curriculum.window=8", "learner.credit=gigpo", "learner.batch_rows=16",
                      "rollout.group_size=2", "rollout.concurrent_episodes=8",
                      "env.max_turns=100", "learner.steps=6", "resources.serial=true",
                      "buffer.max_staleness=4", f"run.dir={tmp_path / 'run'}")
    train(cfg)
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(1 <= m["curriculum/value"] <= 8 for m in metrics)
    assert any("curriculum/pass_rate" in m for m in metrics)
    assert any("is/ess_frac_q4" in m and "is/clip_frac_q1" in m for m in metrics)


@pytest.mark.parametrize("overrides, message", [
    (["learner.credit=gae"], "learner.credit: 'gae' is not one of broadcast, dense, gigpo"),
    (["learner.credit=gigpo"], "set learner.batch_rows"),
    (["learner.credit=dense", "learner.batch_rows=8", "learner.credit_weight=2"],
     "need 0 <= credit_weight <= 1"),
    (["env.curriculum.knob=digits"], "env.curriculum.knob: 'digits' needs an integer"),
    (["env.name=long_addition", "env.kwargs.calls=64", "env.curriculum.knob=calls",
      "env.curriculum.factor=1"],
     "factor > 1"),
])
def test_bad_credit_and_curriculum_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, kept", [("broadcast", False), ("dense", True), ("gigpo", False)])
def test_a_group_of_equal_rewards_is_kept_when_its_segments_still_differ(name, kept):
    """Every episode failed (terminal reward 0), but their calls' proxies differ: `dense` still
    has a signal, so the uniform-group filter keeps the group; broadcast and gigpo (whose
    returns are all 0 here) have none, and it is dropped, counted."""
    from offpolicy.buffer.replay import ReplayBuffer

    buf = ReplayBuffer(batch_groups=1, max_staleness=4, capacity=100, drop_uniform_groups=True,
                       batch_rows=4, advantage=GroupAdvantage(ADVANTAGES["grpo"],
                                                              credit=Credit(name, 0.5)))
    rows = [t for ep, proxies in (("e0", [1.0, 0.0]), ("e1", [1.0, 1.0]))
            for t in _segments(ep, [[1], [2]], 0.0, proxies).rows()]
    buf.add([rows])
    assert buf.store.size == (4 if kept else 0)
    assert buf.counts["filtered"] == (0 if kept else 4)
