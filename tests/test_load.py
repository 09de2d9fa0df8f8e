"""Load: 16 rollout actors with the fake engine feed one buffer for 60 s through Ray.

Nothing may be lost (the ledger balances with no loss), the buffer's bytes stay within
buffer.capacity_bytes, and the staleness bound holds on every update while the learner is
far slower than the actors (admission holds them off).
"""

import time

import pytest

from offpolicy.config.plan import RunPlan
from offpolicy.runtime.ray_roles import RayRoles

from conftest import fast_config

SECONDS, ACTORS, CAPACITY = 60, 16, 60_000


@pytest.mark.ray
def test_sixteen_fake_actors_feed_one_buffer_for_a_minute(model_dir, tmp_path):
    import ray

    cfg = fast_config(model_dir, "engine.name=fake", f"rollout.num_actors={ACTORS}",
                      "resources.actor_cpus=0.1", "resources.learner_cpus=0.2",
                      "engine.logprob_check_every=0", f"buffer.capacity_bytes={CAPACITY}",
                      "buffer.max_staleness=2", "rollout.prompts_per_batch=8",
                      "learner.batch_groups=8", f"run.dir={tmp_path}")
    session = RayRoles(cfg, RunPlan.of(cfg), str(model_dir), log=lambda *a: None)
    session.start()
    try:
        steps, t0 = [], time.monotonic()
        while time.monotonic() - t0 < SECONDS:
            steps.append(session.step())
        elapsed = time.monotonic() - t0
        stats, counts, ledger = session.finish(tmp_path / "final")
    finally:
        ray.shutdown()
    assert ledger["balanced"], ledger
    assert ledger["lost"] == ledger["env_errors"] == ledger["in_flight"] == 0
    assert ledger["admitted"] == sum(c["batches"] for c in counts) * 8 * 4  # every batch arrived
    assert ledger["actors_reported"] == ledger["added"]
    assert len(counts) == ACTORS and all(c["batches"] > 0 for c in counts)  # all of them fed it
    assert max(m["buffer/bytes"] for m in steps) <= CAPACITY
    assert ledger["evicted_capacity"] > 0  # the byte bound was really exercised
    assert max(m["staleness/max"] for m in steps) <= 2
    print(f"\n{len(steps)} updates in {elapsed:.0f} s ({len(steps) / elapsed:.1f}/s), "
          f"{ledger['admitted'] / elapsed:.0f} trajectories/s generated; ledger {ledger}; "
          f"buffer bytes max {max(m['buffer/bytes'] for m in steps)} of {CAPACITY}; "
          f"held off {stats['buffer/held_off']} times")
