"""Replay buffer: whole groups, staleness eviction, admission control, capacity."""

import threading
import time

import numpy as np

from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.core.types import Trajectory


def group(version, gid, size=2):
    return [Trajectory(id=f"{gid}-{k}", group_id=gid, prompt_ids=np.array([1], np.int32),
                       completion_ids=np.array([5, 2], np.int32), loss_mask=np.ones(2, np.int8),
                       behavior_logprobs=np.zeros(2, np.float32),
                       versions=np.full(2, version, np.int32), reward=float(k), env="x",
                       finish_reason="stop") for k in range(size)]


def test_sample_returns_whole_groups_fifo():
    buf = ReplayBuffer(batch_groups=2, max_staleness=4, capacity=100)
    buf.add([group(0, "a"), group(0, "b"), group(0, "c")])
    batch = buf.sample(version=0, timeout=0)
    assert [t.group_id for t in batch.trajectories] == ["a", "a", "b", "b"]
    assert batch.version == 0 and batch.stats["buffer/size"] == 2


def test_stale_groups_are_evicted_and_counted():
    buf = ReplayBuffer(batch_groups=1, max_staleness=2, capacity=100)
    buf.add([group(0, "old"), group(1, "ok"), group(3, "new")])
    batch = buf.sample(version=3, timeout=0)  # oldest allowed version: 3 - 2 = 1
    assert batch.trajectories[0].group_id == "ok"
    assert buf.stats()["buffer/evicted_staleness"] == 2  # both trajectories of "old"


def test_sample_times_out_empty_and_close_releases():
    buf = ReplayBuffer(batch_groups=1, max_staleness=0, capacity=10)
    assert buf.sample(version=0, timeout=0.01) is None
    buf.close()
    assert buf.admit(0, 1).stop is True


def test_capacity_evicts_oldest():
    buf = ReplayBuffer(batch_groups=1, max_staleness=10, capacity=4)
    buf.add([group(0, "a"), group(0, "b"), group(0, "c")])
    s = buf.stats()
    assert s["buffer/size"] == 4 and s["buffer/evicted_capacity"] == 2
    assert buf.sample(0, timeout=0).trajectories[0].group_id == "b"


def test_admission_predicts_the_consuming_version():
    # Batches of 2 groups, bound 1. Next update is version 0.
    buf = ReplayBuffer(batch_groups=2, max_staleness=1, capacity=100)
    assert buf.admit(version=0, n_groups=2, timeout=0).admitted   # consumed at 0: staleness 0
    buf.add([group(0, "a"), group(0, "b")], reserved=2)
    assert buf.admit(version=0, n_groups=2, timeout=0).admitted   # consumed at 1: staleness 1
    buf.add([group(0, "c"), group(0, "d")], reserved=2)
    # A third batch from version 0 would be consumed at version 2: staleness 2 > 1.
    assert not buf.admit(version=0, n_groups=2, timeout=0).admitted
    # Once weights 1 are published an actor loading them would be 1 behind: admitted.
    buf.publish(1)
    decision = buf.admit(version=0, n_groups=2, timeout=0)
    assert decision.admitted and decision.published == 1


def test_blocked_admission_wakes_when_the_learner_consumes():
    buf = ReplayBuffer(batch_groups=1, max_staleness=0, capacity=100)
    assert buf.admit(0, 1, timeout=0).admitted
    buf.add([group(0, "a")], reserved=1)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(admission=buf.admit(0, 1, timeout=30)))
    waiter.start()
    deadline = time.monotonic() + 10
    while buf.counts["held_off"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    # the waiter is blocked: it was held off, and it has no answer yet
    assert buf.counts["held_off"] == 1 and waiter.is_alive() and not result
    buf.sample(version=0, timeout=0)   # the learner takes version 0's batch ...
    buf.publish(1)                     # ... and publishes version 1
    waiter.join(timeout=30)
    admission = result["admission"]
    assert admission.admitted and admission.published == 1 and buf.held_off_s > 0.04


def run_lag(k, steps, batch_groups=2, n_per_order=3, drop_every=0):
    """A learner and one actor taking turns on a lag-mode buffer; returns per-step versions."""
    buf = ReplayBuffer(batch_groups, max_staleness=0, capacity=10_000, drop_uniform_groups=True,
                       lag=k)
    seen, orders, made = [], [], 0
    for t in range(steps):
        while True:
            batch = buf.sample(t, timeout=0)
            if batch is not None:
                break
            order = buf.admit(0, n_per_order, timeout=0)
            assert order.admitted, f"no work offered at step {t} but no batch either"
            orders.append(order.version)
            assert order.version <= buf.published  # only versions that exist
            groups = []
            for _ in range(order.n_groups):
                made += 1
                g = group(order.version, f"g{made}")
                if drop_every and made % drop_every == 0:
                    for tr in g:
                        tr.reward = 0.0  # uniform: filtered, the order must be re-issued
                groups.append(g)
            buf.add(groups, reserved=order.n_groups, version=order.version)
        seen.append(sorted({int(v) for tr in batch.trajectories for v in tr.versions}))
        buf.publish(t + 1)
    return seen, orders, buf


def test_lag_mode_trains_on_exactly_version_t_minus_k():
    for k in (0, 1, 4):
        seen, orders, buf = run_lag(k, steps=12, drop_every=5)
        assert seen == [[max(0, t - k)] for t in range(12)], (k, seen)
        assert orders == sorted(orders)  # work goes to the oldest version still short
        assert buf.counts["filtered"] > 0
        # Orders are sized to what is missing: at most one order's surplus per version.
        assert buf.store.fates["evicted_surplus"] <= 12 * 3 * 2
        assert buf.store.fates["evicted_staleness"] == 0


def test_lag_orders_grow_with_the_filter_rate():
    """When half the groups are filtered, a batch of 2 groups is ordered as 4, not 2 then 1..."""
    buf = ReplayBuffer(2, max_staleness=0, capacity=1000, drop_uniform_groups=True, lag=0)
    assert buf.admit(0, 8, timeout=0).n_groups == 2  # nothing filtered yet
    for i in range(20):  # half of every add is uniform
        bad = group(0, f"u{i}")
        for tr in bad:
            tr.reward = 0.0
        buf.add([group(0, f"g{i}"), bad])
    assert abs(buf.keep_rate - 0.5) < 0.01
    buf.sample(0, timeout=0)
    buf.publish(1)
    order = buf.admit(1, 8, timeout=0)
    assert order.version == 1 and order.n_groups == 4
    assert buf.admit(1, 8, timeout=0).admitted is False  # 4 on order are expected to give 2
    assert buf.admit(1, 3, timeout=0).admitted is False


def test_lag_mode_k0_is_synchronous():
    """k = 0: no work for version t + 1 is offered before the learner publishes it."""
    buf = ReplayBuffer(2, max_staleness=0, capacity=100, lag=0)
    order = buf.admit(0, 5, timeout=0)
    assert order.version == 0 and order.n_groups == 2  # sized to one batch
    assert not buf.admit(0, 5, timeout=0).admitted  # version 0 is fully reserved
    buf.add([group(0, "a"), group(0, "b")], reserved=2, version=0)
    assert buf.sample(0, timeout=0).version == 0
    assert not buf.admit(0, 5, timeout=0).admitted  # version 1 not published yet
    buf.publish(1)
    assert buf.admit(1, 5, timeout=0).version == 1
