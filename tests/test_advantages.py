"""Advantage estimators on one small batch computed by hand."""

import math

import numpy as np
import pytest

from offpolicy.advantages import ADVANTAGES

# Group 0: rewards 1, 0, 0, 0 (mean 0.25, population std sqrt(0.1875)); group 1: 1, 1.
REWARDS = np.array([1, 0, 0, 0, 1, 1], dtype=np.float32)
GROUPS = np.array([0, 0, 0, 0, 1, 1])
STD0 = math.sqrt(0.1875)


@pytest.mark.parametrize("name, expected", [
    ("grpo", [0.75 / STD0, -0.25 / STD0, -0.25 / STD0, -0.25 / STD0, 0, 0]),
    ("dr_grpo", [0.75, -0.25, -0.25, -0.25, 0, 0]),
    ("rloo", [1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0]),       # r_i - mean of the others
    ("reinforce", [0.5, -0.5, -0.5, -0.5, 0.5, 0.5]),     # batch mean 0.5
])
def test_advantages(name, expected):
    got = ADVANTAGES[name](REWARDS, GROUPS)
    assert got.dtype == np.float32 and got.shape == (6,)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
