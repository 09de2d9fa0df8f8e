"""Replay: samplers, priorities, reuse, byte capacity, filtering counts, snapshot round trip."""

import math
import random

import numpy as np
import pytest

from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.buffer.samplers import (SAMPLERS, PrioritizedSampler, SumTree, advantage_priority,
                                       binary_entropy, pass_rate_priority)
from offpolicy.core.types import Incarnation, Trajectory


def group(gid, rewards, version=0):
    return [Trajectory(id=f"{gid}-{k}", group_id=gid, prompt_ids=np.array([1, 4], np.int32),
                       completion_ids=np.array([5, 6, 2], np.int32),
                       loss_mask=np.ones(3, np.int8), behavior_logprobs=np.zeros(3, np.float32),
                       versions=np.full(3, version, np.int32), reward=float(r), env="x",
                       finish_reason="stop") for k, r in enumerate(rewards)]


def mixed(gid, version=0, n=4):
    return group(gid, [k % 2 for k in range(n)], version)  # pass rate 0.5


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_batches_hold_whole_groups_and_reuse_is_bounded(sampler):
    buf = ReplayBuffer(3, max_staleness=100, capacity=10_000, sampler=sampler, max_reuse=2,
                       seed=1)
    buf.add([group(f"g{i}", [0, 1, i % 2, 1]) for i in range(10)])
    uses = {}
    for step in range(6):  # 18 group draws of 10 groups x 2 uses: some retire, none overused
        batch = buf.sample(step, timeout=0)
        ids = [t.group_id for t in batch.trajectories]
        chunks = [ids[i:i + 4] for i in range(0, len(ids), 4)]
        assert all(len(set(c)) == 1 for c in chunks) and len({c[0] for c in chunks}) == 3
        for c in chunks:
            uses[c[0]] = uses.get(c[0], 0) + 1
    assert max(uses.values()) <= 2
    s = buf.stats()
    assert s["buffer/reuse_hist"]["1"] + s["buffer/reuse_hist"].get("2", 0) == 18
    assert s["buffer/retired"] == 4 * sum(1 for n in uses.values() if n == 2)
    assert s["buffer/groups"] == 10 - sum(1 for n in uses.values() if n == 2)


def test_fifo_reuse_keeps_the_oldest_until_used_up():
    buf = ReplayBuffer(1, max_staleness=100, capacity=100, max_reuse=3)
    buf.add([mixed("a"), mixed("b")])
    order = [buf.sample(v, timeout=0).trajectories[0].group_id for v in range(5)]
    assert order == ["a", "a", "a", "b", "b"]


def test_sum_tree_finds_by_cumulative_sum_and_grows():
    tree, values = SumTree(capacity=2), [0.5, 0.0, 2.0, 1.5, 0.25, 3.0]
    for slot, v in enumerate(values):  # slot 4 and 5 force two doublings
        tree.set(slot, v)
    assert tree.cap == 8 and math.isclose(tree.total, sum(values))
    cum = np.cumsum(values)
    for u in np.linspace(0, tree.total - 1e-9, 97):
        assert tree.find(u) == int(np.searchsorted(cum, u, side="right"))
    tree.set(2, 0.0)  # a zeroed slot is never found, even at its old boundaries
    assert all(tree.find(u) != 2 for u in np.linspace(0, tree.total - 1e-9, 97))


def test_prioritized_frequencies_match_priorities():
    """50k single draws over 5 slots: each frequency within 4 standard errors of
    p ** alpha / sum, and the importance weights follow (N P) ** -beta / max."""
    prios = [0.0, 0.1, 0.3, 0.6, 1.0]
    s = PrioritizedSampler(seed=3, alpha=0.7, beta=0.5, eps=0.01)
    for slot, p in enumerate(prios):
        s.add(slot, p)
    want = np.array([(p + 0.01) ** 0.7 for p in prios])
    want /= want.sum()
    n = 50_000
    counts = np.bincount([s.sample(1)[0][0] for _ in range(n)], minlength=5)
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(counts / n - want) < 4 * se), (counts / n, want)
    slots, w = s.sample(5)
    assert sorted(slots) == [0, 1, 2, 3, 4]  # one call never repeats a slot
    expect = (5 * want[slots]) ** -0.5
    assert np.allclose(w, expect / expect.max(), rtol=1e-5)


def test_priorities_peak_at_half_and_match_advantages():
    assert pass_rate_priority(group("a", [1, 0, 1, 0])) == 1.0
    assert pass_rate_priority(group("a", [1, 1, 1, 1])) == 0.0
    assert math.isclose(pass_rate_priority(group("a", [1, 0, 0, 0])), 0.75)
    # rewards 1, 0, 0, 0: mean 0.25, std sqrt(3)/4 -> |A| = 3/sqrt(3), 1/sqrt(3) x 3 -> mean
    assert math.isclose(advantage_priority(group("a", [1, 0, 0, 0])),
                        (math.sqrt(3) + 3 / math.sqrt(3)) / 4, rel_tol=1e-4)
    assert binary_entropy(0.5) == 1.0 and binary_entropy(1.0) == 0.0


def test_prioritized_buffer_prefers_informative_groups_and_weights_them():
    buf = ReplayBuffer(1, max_staleness=10**6, capacity=10_000, sampler="prioritized", alpha=1.0,
                       beta=1.0, max_reuse=10**9, seed=0)
    buf.add([group("half", [1, 0, 1, 0]), group("rare", [1, 0, 0, 0, 0, 0, 0, 0])])
    seen = [buf.sample(v, timeout=0) for v in range(4000)]
    share = np.mean([b.trajectories[0].group_id == "half" for b in seen])
    p_half = 1.01 / (1.01 + 4 * 0.125 * 0.875 + 0.01)  # priority + eps, alpha 1
    assert abs(share - p_half) < 0.03
    # beta 1 with one group per batch: the weight normalised by the batch max is 1
    assert all(np.allclose(b.weights, 1.0) for b in seen[:5])
    assert len(seen[0].weights) == len(seen[0].trajectories)
    assert math.isclose(seen[0].stats["buffer/bits_per_sample"],
                        binary_entropy(0.5 if seen[0].trajectories[0].group_id == "half"
                                       else 0.125))


def test_byte_capacity_evicts_oldest_and_counts():
    one = sum(t.nbytes for t in mixed("g9"))
    buf = ReplayBuffer(1, max_staleness=100, capacity=10**6, capacity_bytes=int(2.5 * one))
    buf.add([mixed(f"g{i}") for i in range(5)])
    s = buf.stats()
    assert s["buffer/bytes"] == 2 * one <= int(2.5 * one)
    assert s["buffer/evicted_capacity"] == 3 * 4 and s["buffer/groups"] == 2
    assert buf.sample(0, timeout=0).trajectories[0].group_id == "g3"


def test_uniform_groups_are_filtered_and_counted():
    buf = ReplayBuffer(1, max_staleness=100, capacity=100, drop_uniform_groups=True)
    buf.add([group("all-right", [1, 1, 1, 1]), group("all-wrong", [0, 0, 0, 0]), mixed("m")])
    s = buf.stats()
    assert s["buffer/filtered"] == 8 and s["buffer/added"] == 12 and s["buffer/groups"] == 1


def test_staleness_eviction_uses_each_groups_oldest_token():
    buf = ReplayBuffer(1, max_staleness=2, capacity=100, sampler="uniform", max_reuse=5)
    buf.add([mixed("v0", 0), mixed("v3", 3), mixed("v1", 1)])
    batch = buf.sample(3, timeout=0)  # oldest allowed: 1
    assert batch.trajectories[0].group_id in ("v3", "v1")
    assert buf.stats()["buffer/evicted_staleness"] == 4
    assert batch.stats["buffer/sampled_staleness"] in (0.0, 2.0)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_snapshot_round_trip_continues_identically(sampler, tmp_path):
    def fresh():
        return ReplayBuffer(2, max_staleness=50, capacity=1000, sampler=sampler, max_reuse=3,
                            drop_uniform_groups=True, seed=7)

    rng = random.Random(0)
    buf = fresh()
    for v in range(6):
        buf.add([group(f"g{v}-{i}", [rng.random() < 0.5 for _ in range(4)], v)
                 for i in range(3)])
        buf.sample(v, timeout=0)
    nbytes = buf.save(tmp_path / "buffer.pkl")
    assert nbytes > 0
    other = fresh()
    other.load(tmp_path / "buffer.pkl")
    assert other.stats() == buf.stats()
    for v in range(6, 10):
        a, b = buf.sample(v, timeout=0), other.sample(v, timeout=0)
        assert [t.id for t in a.trajectories] == [t.id for t in b.trajectories]
        assert (a.weights is None) == (b.weights is None)


def test_a_snapshot_is_a_copy_and_a_resumed_run_keeps_its_own_sampler():
    buf = ReplayBuffer(2, max_staleness=50, capacity=1000, sampler="fifo", max_reuse=3)
    buf.add([mixed(f"g{i}") for i in range(5)])
    buf.sample(0, timeout=0)
    snap = buf.snapshot()
    buf.add([mixed("later")])  # the buffer goes on; the snapshot must not
    assert len(snap["store"]["entries"]) == 5
    other = ReplayBuffer(2, max_staleness=50, capacity=1000, sampler="prioritized",
                         max_reuse=3)
    other.restore(snap)
    assert isinstance(other.store.sampler, PrioritizedSampler) and len(other.store.sampler) == 5
    assert other.stats()["buffer/groups"] == 5
    batch = other.sample(1, timeout=0)
    assert batch is not None and batch.weights is not None  # prioritized replay's weights


@pytest.mark.parametrize("lag", [None, 1])
def test_restore_forgets_batches_in_flight_and_releases_their_reservations(lag):
    buf = ReplayBuffer(2, max_staleness=5, capacity=1000, lag=lag, group_size=4)
    admission = buf.admit(0, 2, timeout=0, actor=Incarnation(0, "a"))
    assert admission.admitted and buf.reserved == 2
    other = ReplayBuffer(2, max_staleness=5, capacity=1000, lag=lag, group_size=4)
    other.restore(buf.snapshot())
    other.settle_restore()  # no actor took on the batch in flight
    ledger = other.ledger()
    assert other.reserved == 0 and ledger["in_flight"] == 0 and ledger["lost"] == 8
    assert ledger["balanced"] and other.admit(0, 2, timeout=0, actor=Incarnation(0, "b")).admitted


def test_filter_floor_keeps_uniform_groups_when_almost_all_would_be_dropped():
    """A collapsed policy (every group all-wrong) would regenerate forever; below the floor
    uniform groups are kept and counted, and filtering resumes once signal comes back."""
    buf = ReplayBuffer(1, max_staleness=100, capacity=10_000, drop_uniform_groups=True,
                       filter_floor=0.25)
    for i in range(8):
        buf.add([group(f"dead{i}", [0, 0, 0, 0])])
    s = buf.stats()
    assert s["buffer/filtered"] == 4 * 7 and s["buffer/kept_uniform"] == 4  # 0.8 ** 7 < 0.25
    for i in range(8):
        buf.add([mixed(f"live{i}")])
    buf.add([group("dead-again", [0, 0, 0, 0])])
    assert buf.stats()["buffer/filtered"] == 4 * 8  # signal is back: filtered again
