"""Batch.padded lines targets, masks, behaviour log-probs and versions up by hand."""

import numpy as np

from offpolicy.core.types import Batch, Trajectory


def traj(prompt, completion, versions, group="g", reward=1.0):
    T = len(completion)
    return Trajectory(id="t", group_id=group, prompt_ids=np.array(prompt, np.int32),
                      completion_ids=np.array(completion, np.int32),
                      loss_mask=np.ones(T, np.int8),
                      behavior_logprobs=-np.arange(1, T + 1, dtype=np.float32),
                      versions=np.array(versions, np.int32), reward=reward, env="x",
                      finish_reason="stop")


def test_padded_alignment():
    b = Batch([traj([1, 5, 6], [7, 2], [3, 4]), traj([1, 5], [8, 9, 2], [4, 4, 4], "h")], 6)
    d = b.padded(pad_id=0)
    assert d.input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 9, 2]]
    assert d.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert d.targets.tolist() == [[5, 6, 7, 2], [5, 8, 9, 2]]
    # Row 1: completion tokens 7, 2 are targets 2 and 3; row 2: 8, 9, 2 are targets 1..3.
    assert d.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert d.behavior_logprobs.tolist() == [[0, 0, -1, -2], [0, -1, -2, -3]]
    assert d.versions.tolist() == [[-1, -1, 3, 4], [-1, 4, 4, 4]]
    assert b.group_index().tolist() == [0, 1]


def test_min_version_ignores_environment_tokens():
    t = traj([1], [7, 8, 9], [5, -1, 6])
    t.loss_mask = np.array([1, 0, 1], np.int8)
    assert t.min_version() == 5


def test_batches_and_groups_pickle_packed_and_round_trip():
    import pickle

    from offpolicy.core.types import Groups

    trajs = [traj([1, 2], [3, 4, 5], [0, 1, 1], group="a", reward=0.5),
             traj([6], [7], [2], group="a"), traj([8, 9, 10], [], [], group="b", reward=0.0)]
    trajs[0].loss_mask[1] = 0
    trajs[0].info = {"turns": 2}
    batch = Batch(trajs, version=3, stats={"buffer/size": 7},
                  weights=np.array([1.0, 0.5, 2.0], np.float32))
    back = pickle.loads(pickle.dumps(batch, protocol=5))
    assert back.version == 3 and back.stats == {"buffer/size": 7}
    assert np.array_equal(back.weights, batch.weights)
    for a, b in zip(trajs, back.trajectories, strict=True):
        for name in ("prompt_ids", "completion_ids", "loss_mask", "behavior_logprobs", "versions"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y) and y.base is None, name
        assert (a.id, a.group_id, a.reward, a.env, a.finish_reason, a.info) == \
               (b.id, b.group_id, b.reward, b.env, b.finish_reason, b.info)
    groups = pickle.loads(pickle.dumps(Groups([trajs[:2], trajs[2:]])))
    assert type(groups) is list and [len(g) for g in groups] == [2, 1]
    assert groups[1][0].group_id == "b" and np.array_equal(groups[0][0].versions, [0, 1, 1])
