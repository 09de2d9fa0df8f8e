"""Advantage estimators on one small batch computed by hand."""

import math

import numpy as np
import pytest

from offpolicy.algorithms.advantages import (ADVANTAGES, asymre_advantage, oapl_advantage,
                                  vcpo_advantage)

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


LOG_W = np.array([0.0, math.log(2), 0.0, 0.0, 0.0, 0.0])   # row 1's sequence weight is 2
LENGTHS = np.array([1, 1, 2, 1, 3, 3])


@pytest.mark.parametrize("fn, params, expected", [
    # V* = log((e + 3) / 4) = 0.357374 for group 0, 1 for the all-ones group 1
    (oapl_advantage, {}, [1 - 0.357374, -0.357374, -0.357374, -0.357374, 0, 0]),
    # small beta_v tends to the group max: V* = 1 + 0.01 log(1 / 4) = 0.986137
    (oapl_advantage, {"beta_v": 0.01}, [0.013863, -0.986137, -0.986137, -0.986137, 0, 0]),
    # r - (mean - 0.1)
    (asymre_advantage, {}, [0.85, -0.15, -0.15, -0.15, 0.1, 0.1]),
    (asymre_advantage, {"delta": 0.0}, [0.75, -0.25, -0.25, -0.25, 0, 0]),
    # w^2 * length = 1, 4, 2, 1: b* = 1 / 8; divided by the group std
    (vcpo_advantage, {}, [0.875 / STD0, -0.125 / STD0, -0.125 / STD0, -0.125 / STD0, 0, 0]),
])
def test_a_loss_s_own_advantages(fn, params, expected):
    got = fn(REWARDS, GROUPS, LOG_W, LENGTHS, **params)
    assert got.dtype == np.float32 and got.tolist() == pytest.approx(expected, abs=1e-5)


def test_vcpo_baseline_is_grpo_on_policy_and_finite_far_off_policy():
    on = vcpo_advantage(REWARDS, GROUPS, np.zeros(6), np.ones(6))
    assert on.tolist() == pytest.approx(ADVANTAGES["grpo"](REWARDS, GROUPS).tolist(), abs=1e-5)
    far = vcpo_advantage(REWARDS, GROUPS, np.array([900.0, -900, 0, 0, 700, 0]), LENGTHS)
    assert np.isfinite(far).all()
    # the dominant weight puts the baseline on row 0's reward: it gets no advantage
    assert far[0] == pytest.approx(0.0, abs=1e-5)


def test_loss_params_split_between_the_loss_and_its_own_advantage():
    from offpolicy.algorithms.losses import LOSSES
    from offpolicy.core.errors import ConfigError

    assert LOSSES["oapl"].split({"beta": 0.2, "beta_v": 0.5}) == ({"beta": 0.2},
                                                                  {"beta_v": 0.5})
    assert LOSSES["tis"].split({"cap": 3.0}) == ({"cap": 3.0}, {})
    LOSSES["asymre"].check({"delta": -0.2})
    with pytest.raises(ConfigError, match="loss.params.delta: not a parameter of loss 'tis'"):
        LOSSES["tis"].check({"delta": -0.2})
