"""Losses and IS diagnostics against values computed by hand (see the comments)."""

import math

import pytest
import torch

from offpolicy.losses import LOSSES, LossInputs, importance_diagnostics

# Two sequences, two target positions; the last token of row 2 is masked out.
LP = [[-1.0, -2.0], [-0.5, -3.0]]
ADV = [[2.0, 2.0], [-1.0, -1.0]]
MASK = [[1.0, 1.0], [1.0, 0.0]]
# Behaviour log-probs chosen so the ratios pi/mu are [[1, 4], [0.5, 1]].
BEHAVIOR = [[-1.0, -2.0 - math.log(4)], [-0.5 + math.log(2), -3.0]]


def inputs(behavior=BEHAVIOR):
    lp = torch.tensor(LP, requires_grad=True)
    return LossInputs(logprobs=lp, behavior_logprobs=torch.tensor(behavior),
                      advantages=torch.tensor(ADV), mask=torch.tensor(MASK)), lp


def test_pg_value_and_gradient():
    x, lp = inputs()
    loss, _ = LOSSES["pg"](x)
    # -(A * lp) over the 3 policy tokens: (2*1 + 2*2 - 1*0.5) / 3 = 5.5 / 3
    assert loss.item() == pytest.approx(5.5 / 3)
    loss.backward()
    # d/dlp = -A * mask / 3; the masked token gets exactly zero
    assert torch.allclose(lp.grad, torch.tensor([[-2 / 3, -2 / 3], [1 / 3, 0.0]]))


def test_tis_truncates_the_weight_at_cap():
    x, lp = inputs()
    loss, metrics = LOSSES["tis"](x, cap=2.0)
    # weights min(r, 2) = [[1, 2], [0.5, -]]: -(1*2*-1 + 2*2*-2 + 0.5*-1*-0.5) / 3 = 9.75 / 3
    assert loss.item() == pytest.approx(3.25)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-2 / 3, -4 / 3], [1 / 6, 0.0]]))
    assert metrics["is/clip_frac"] == pytest.approx(1 / 3)  # only the ratio-4 token


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_on_policy_gradient_is_a_positive_multiple_of_pg(name):
    on_policy = [row[:] for row in LP]  # behaviour == current: every ratio is 1
    x, lp = inputs(behavior=on_policy)
    LOSSES[name](x)[0].backward()
    y, lp_pg = inputs(behavior=on_policy)
    LOSSES["pg"](y)[0].backward()
    scale = (lp.grad * lp_pg.grad).sum() / (lp_pg.grad ** 2).sum()
    assert scale > 0
    assert torch.allclose(lp.grad, scale * lp_pg.grad, atol=1e-6)


def test_tis_gradient_stays_bounded_for_huge_ratios():
    x, lp = inputs(behavior=[[-1.0 - math.log(1e6), -20.0], [-30.0, -3.0]])
    loss, _ = LOSSES["tis"](x, cap=2.0)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert lp.grad.abs().max().item() <= 2.0 * 2.0 / 3 + 1e-6  # cap * |A| / n_tokens


def test_importance_diagnostics_by_hand():
    m = importance_diagnostics(torch.tensor(LP), torch.tensor(BEHAVIOR), torch.tensor(MASK))
    # ratios over policy tokens: 1, 4, 0.5
    assert m["is/ratio_mean"] == pytest.approx(5.5 / 3)
    assert m["is/ratio_max"] == pytest.approx(4.0)
    assert m["is/ess_frac"] == pytest.approx(5.5 ** 2 / (3 * (1 + 16 + 0.25)))
    assert m["is/kl_k1"] == pytest.approx(-(math.log(4) + math.log(0.5)) / 3)
    assert m["is/kl_k3"] == pytest.approx(((3 - math.log(4)) + (-0.5 - math.log(0.5))) / 3)
