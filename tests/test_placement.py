"""resources.pin_cpus: which cores the learner's side and the actors get (no Ray needed)."""

import os

import pytest

from offpolicy.runtime import placement
from offpolicy.runtime.validate import load_config


class _Handle:
    """Stands in for a Ray actor handle: `__ray_call__.remote(fn, *args)` runs fn at once."""

    def __init__(self):
        self.cores = None
        outer = self

        class Call:
            @staticmethod
            def remote(fn, *args):
                if fn is placement._niceness:
                    return 0  # Ray workers started by `offpolicy train` with actor_nice
                outer.cores = args[0]
                return None

        self.__ray_call__ = Call


class _Ray:
    @staticmethod
    def get(refs):
        return refs


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_learner_side_and_actors_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    set_calls = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: set_calls.append(cores))
    assert placement.core_split(1.0) == ({0}, {1, 2, 3})
    assert placement.core_split(1.5) == ({0, 1}, {2, 3})  # rounded up to whole cores
    assert placement.core_split(4) is None  # nothing left for the actors: no pinning

    learner = _Handle()
    roles = {"learner": learner, "learners": [learner, _Handle()], "buffer": _Handle(),
             "store": _Handle(), "desk": _Handle(), "actors": [_Handle(), _Handle()]}
    one_node = {"driver": "a", "buffer": "a", "store": "a", "learners": ["a", "a"],
                "actors": ["a", "a"]}
    cfg = load_config(None, ["resources.pin_cpus=true", "resources.learner_cpus=0.5"])
    assert placement.pin_roles(cfg, roles, _Ray, one_node) == {"learner": [0], "actors": [1, 2, 3]}
    assert ([h.cores for h in (*roles["learners"], roles["buffer"], roles["store"],
                                roles["desk"])] == [{0}] * 5)
    assert [a.cores for a in roles["actors"]] == [{1, 2, 3}] * 2
    assert set_calls == [{0}]  # the driver joins the learner's side
    # with actor_nice the actors are reniced instead and may use every core
    for a in roles["actors"]:
        a.cores = None
    cfg = load_config(None, ["resources.pin_cpus=true", "resources.actor_nice=19"])
    placement.pin_roles(cfg, roles, _Ray, one_node)
    assert learner.cores == {0} and [a.cores for a in roles["actors"]] == [19, 19]
    cfg = load_config(None, [])  # off by default: nothing is pinned
    learner.cores = None
    assert placement.pin_roles(cfg, roles, _Ray, one_node) is None and learner.cores is None
    # core numbers are one machine's: roles on two nodes are not pinned
    cfg = load_config(None, ["resources.pin_cpus=true"])
    two_nodes = {**one_node, "actors": ["a", "b"]}
    assert placement.pin_roles(cfg, roles, _Ray, two_nodes) is None and learner.cores is None


def test_actor_nice_out_of_range_is_a_config_error():
    from offpolicy.core.errors import ConfigError

    with pytest.raises(ConfigError, match="resources.actor_nice: 25"):
        load_config(None, ["resources.actor_nice=25"])


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="Linux only")
def test_run_with_actor_nice_starts_ray_workers_at_niceness_0(monkeypatch):
    """Ray's default worker niceness is 15: reniced actors (19) would then still take about
    30% of a core from the learner. `start_ray` starts the workers at 0 instead."""
    import ray

    from offpolicy.runtime.placement import start_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    cfg = load_config(None, ["resources.actor_nice=19", "resources.num_cpus=1",
                             "rollout.num_actors=1", "resources.actor_cpus=0.5",
                             "resources.learner_cpus=0.5"])
    start_ray(cfg)
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def niceness(self):
                return os.getpriority(os.PRIO_PROCESS, 0)

        assert ray.get(Probe.remote().niceness.remote()) == 0
        assert "RAY_worker_niceness" not in os.environ  # only the raylet saw it
    finally:
        ray.shutdown()
