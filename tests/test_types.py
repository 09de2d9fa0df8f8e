"""Batch.padded lines targets, masks, behaviour log-probs and versions up by hand."""

import numpy as np

from offpolicy.types import Batch, Trajectory


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
    assert d["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 9, 2]]
    assert d["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert d["targets"].tolist() == [[5, 6, 7, 2], [5, 8, 9, 2]]
    # Row 1: completion tokens 7, 2 are targets 2 and 3; row 2: 8, 9, 2 are targets 1..3.
    assert d["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert d["behavior_logprobs"].tolist() == [[0, 0, -1, -2], [0, -1, -2, -3]]
    assert d["versions"].tolist() == [[-1, -1, 3, 4], [-1, 4, 4, 4]]
    assert b.group_index().tolist() == [0, 1]


def test_min_version_ignores_environment_tokens():
    t = traj([1], [7, 8, 9], [5, -1, 6])
    t.loss_mask = np.array([1, 0, 1], np.int8)
    assert t.min_version() == 5
