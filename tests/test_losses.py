"""Losses and IS diagnostics against values computed by hand (see the comments)."""

import math

import pytest
import torch

from offpolicy.algorithms.losses import (LOSSES, LossInputs, importance_diagnostics, kl_penalty,
                              regularized)

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


LN2, LN4 = math.log(2), math.log(4)
# Ratios [[0.5, 0.25], [0.5, -]]: V-trace's traces then matter for the first token.
BEHAVIOR_V = [[-1.0 + LN2, -2.0 + LN4], [-0.5 + LN2, -3.0]]


# Policy tokens: t1 (lp -1, A 2, r 1), t2 (lp -2, A 2, r 4), t3 (lp -0.5, A -1, r 0.5); N = 3.
BY_HAND = [
    # min(rA, clip(r, 0.8, 1.28) A): t1 2, t2 clipped 2.56, t3 clipped -0.8; only t1 has grad
    ("ppo_clip", {}, BEHAVIOR, -(2 + 2.56 - 0.8) / 3, [[-2 / 3, 0], [0, 0]], 2 / 3),
    # sequence geometric ratios 2 and 0.5; band [0.5, 1.5] drops sequence 1
    ("seq_mask_is", {"high": 1.5}, BEHAVIOR, -0.25 / 3, [[0, 0], [1 / 6, 0]], 2 / 3),
    # band [0.5, 2] masks t2 (r 4); weights r on the rest
    ("icepop", {"high": 2.0}, BEHAVIOR, 1.75 / 3, [[-2 / 3, 0], [1 / 6, 0]], 1 / 3),
    # ratios 0.5, 0.25 | 0.5: weights t1 0.5 * 0.25 (trace of t2), t2 0.25, t3 0.5
    ("vtrace", {}, BEHAVIOR_V, 1 / 3, [[-1 / 12, -1 / 6], [1 / 6, 0]], 0.0),
    # proximal = current: r = 1, behaviour weights 1, 4, 0.5 (cap 2 -> 1, 2, 0.5)
    ("decoupled_ppo", {}, BEHAVIOR, -9.5 / 3, [[-2 / 3, -8 / 3], [1 / 6, 0]], 0.0),
    ("decoupled_ppo", {"behav_cap": 2.0}, BEHAVIOR, -5.5 / 3, [[-2 / 3, -4 / 3], [1 / 6, 0]], 0.0),
    # (log r)^2 = 0, 1.92, 0.48: tau 0.04 keeps t1 only; tau 0.25 drops t2 only
    ("m2po", {}, BEHAVIOR, -2 / 3, [[-2 / 3, 0], [0, 0]], 2 / 3),
    ("m2po", {"tau": 0.25}, BEHAVIOR, -1.5 / 3, [[-2 / 3, 0], [1 / 6, 0]], 1 / 3),
    # weights clip(r, 0, 1.28) = 1, 1.28, 0.5
    ("cispo", {}, BEHAVIOR, 6.87 / 3, [[-2 / 3, -2.56 / 3], [1 / 6, 0]], 1 / 3),
    # s = 2 (A 2) and 0.5 (A -1) inside [0.4, 2.5]: -(4 - 0.5) / 2; d/dlp = -s A / (2 |y|)
    ("gspo", {"eps_low": 0.6, "eps_high": 1.5}, BEHAVIOR, -1.75, [[-1, -1], [0.25, 0]], 0.0),
    # A >= 0 weight 1; A < 0 weight min(sequence ratio, 1) = 0.5
    ("topr", {}, BEHAVIOR, 5.75 / 3, [[-2 / 3, -2 / 3], [1 / 6, 0]], 1 / 3),
    # sequence log-ratios s = ln 4 (A 2) and -ln 2 (A -1); residuals e = beta s - A:
    # beta 0.1: e = -1.86137, 0.93069; loss (e1^2 + e2^2) / 2; d/dlp = 2 e beta / 2 per token
    ("oapl", {}, BEHAVIOR, 2.1654377, [[-0.1861371, -0.1861371], [0.0930685, 0]], 0.0),
    # beta 2: e = 0.77259, -0.38629, both past their targets (the gradient pulls back)
    ("oapl", {"beta": 2.0}, BEHAVIOR, 0.3730583, [[1.5451774, 1.5451774], [-0.7725887, 0]], 1.0),
    # no importance weight: the same value and gradient as pg on the same advantages
    ("asymre", {}, BEHAVIOR, 5.5 / 3, [[-2 / 3, -2 / 3], [1 / 3, 0]], 0.0),
    # proximal = current: sequence weights w = 4 and 0.5, r = 1: -(4 * 2 + 0.5 * -1) / 2;
    # d/dlp = -w A / (2 |y|)
    ("vcpo", {}, BEHAVIOR, -3.75, [[-2, -2], [0.25, 0]], 0.0),
    # cap 2 truncates the first sequence's weight
    ("vcpo", {"cap": 2.0}, BEHAVIOR, -1.75, [[-1, -1], [0.25, 0]], 0.5),
]


@pytest.mark.parametrize("name, params, behavior, loss, grad, frac", BY_HAND)
def test_loss_by_hand(name, params, behavior, loss, grad, frac):
    x, lp = inputs(behavior)
    value, metrics = LOSSES[name](x, **params)
    assert value.item() == pytest.approx(loss, abs=1e-5)
    value.backward()
    assert torch.allclose(lp.grad, torch.tensor(grad), atol=1e-5)
    assert metrics.get("is/clip_frac", 0.0) == pytest.approx(frac, abs=1e-6)


def test_every_registered_loss_has_a_case_computed_by_hand():
    # pg and tis have their own tests above
    assert {case[0] for case in BY_HAND} | {"pg", "tis"} == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_on_policy_gradient_is_a_positive_multiple_of_pg(name):
    # behaviour == current (every ratio 1), all tokens count (GSPO weighs tokens by 1/length,
    # which equals pg's token mean when lengths are equal)
    def grad(loss_name):
        lp = torch.tensor(LP, requires_grad=True)
        x = LossInputs(logprobs=lp, behavior_logprobs=torch.tensor(LP),
                       advantages=torch.tensor(ADV), mask=torch.ones(2, 2))
        LOSSES[loss_name](x)[0].backward()
        return lp.grad
    g, g_pg = grad(name), grad("pg")
    scale = (g * g_pg).sum() / (g_pg ** 2).sum()
    assert scale > 0
    assert torch.allclose(g, scale * g_pg, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_metrics_are_detached_tensors_converted_by_the_learner(name):
    """No loss syncs with the device for its metrics: each is a 0-dim tensor without grad."""
    x, _ = inputs(behavior=[[-1.5, -2.0], [-0.2, -3.0]])
    _, metrics = LOSSES[name](x)
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad, key


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_tokens_get_zero_gradient(name):
    x, lp = inputs()
    LOSSES[name](x)[0].backward()
    assert lp.grad[1, 1].item() == 0.0


# Every registered loss corrects for off-policy data except plain `pg` (no ratio, nothing to
# bound); a new loss is tested here unless it is added to this set on purpose.
UNCORRECTED = {"pg"}
# Losses whose bound on the behaviour weight is a parameter off by default.
BOUNDING_PARAMS = {"decoupled_ppo": {"behav_cap": 5.0}}


@pytest.mark.parametrize("name", sorted(set(LOSSES) - UNCORRECTED))
def test_huge_ratios_give_finite_bounded_gradients(name):
    # ratios 1e6, e^18, e^27.5: a truncating or masking loss must not pass them through
    x, lp = inputs(behavior=[[-1.0 - math.log(1e6), -20.0], [-30.0, -3.0]])
    params = BOUNDING_PARAMS.get(name, {})
    value, _ = LOSSES[name](x, **params)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(lp.grad).all()
    assert lp.grad.abs().max().item() <= 5.0 * 2.0


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


# Reference log-probs chosen so log r = ref - lp = [[0, ln 2], [-ln 2, 5]] (the last is masked).
REF = [[-1.0, -2.0 + math.log(2)], [-0.5 - math.log(2), 2.0]]


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor(LP), torch.tensor(REF)
    ln2 = math.log(2)
    assert torch.allclose(kl_penalty(lp, ref, "k1")[:, :1], torch.tensor([[0.0], [ln2]]))
    assert kl_penalty(lp, ref, "k1")[0, 1].item() == pytest.approx(-ln2)
    assert kl_penalty(lp, ref, "k2")[0, 1].item() == pytest.approx(ln2 ** 2 / 2)
    # k3 = r - 1 - log r: r = 2 -> 1 - ln 2; r = 1/2 -> ln 2 - 1/2; never negative
    k3 = kl_penalty(lp, ref, "k3")
    assert k3[0, 1].item() == pytest.approx(1 - ln2)
    assert k3[1, 0].item() == pytest.approx(ln2 - 0.5)
    assert (k3 >= 0).all() and k3[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_kl_and_entropy_terms_add_to_every_loss(name):
    """loss - c_H * mean H + c_KL * mean k3, over policy tokens, for each registered loss."""
    x, lp = inputs()
    base, _ = LOSSES[name](x)
    base.backward()
    base_grad = lp.grad.clone()
    x, lp = inputs()
    entropy = torch.tensor([[1.0, 2.0], [3.0, 100.0]], requires_grad=True)  # 100 is masked
    kl = kl_penalty(lp, torch.tensor(REF), "k3")
    loss, m = regularized(LOSSES[name](x)[0], x.mask, entropy, 0.1, kl, 0.5)
    ln2 = math.log(2)
    kl_mean = ((1 - ln2) + (ln2 - 0.5)) / 3
    assert m["learner/entropy"] == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert m["kl/ref"] == pytest.approx(kl_mean)
    assert loss.item() == pytest.approx(base.item() - 0.1 * 2.0 + 0.5 * kl_mean, rel=1e-5)
    loss.backward()
    # d k3 / d lp = 1 - r: [[0, -1], [1/2, -]] / 3 tokens, times 0.5
    kl_grad = torch.tensor([[0.0, -1.0], [0.5, 0.0]]) * 0.5 / 3
    assert torch.allclose(lp.grad, base_grad + kl_grad, atol=1e-6)
    assert torch.allclose(entropy.grad, torch.tensor([[-0.1, -0.1], [-0.1, 0.0]]) / 3)


def test_zero_coefficients_leave_the_loss_alone():
    x, lp = inputs()
    base, _ = LOSSES["tis"](x)
    loss, m = regularized(base, x.mask, torch.ones(2, 2))
    assert loss is base and m == {"learner/entropy": 1.0}


def test_token_entropy_matches_the_distribution():
    from offpolicy.algorithms.logprobs import token_logprobs

    class Fixed(torch.nn.Module):  # logits: uniform over 4 tokens, then one-hot-ish
        def forward(self, input_ids, attention_mask):
            logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [0.0] * 4]])
            return type("Out", (), {"logits": logits})

    ids = torch.zeros(1, 3, dtype=torch.long)
    lp, ent = token_logprobs(Fixed(), ids, torch.ones_like(ids), ids[:, 1:], entropy=True)
    p = torch.softmax(torch.tensor([10.0, 0, 0, 0]), 0)
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    assert ent[0, 1].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-3)  # float32
    assert lp[0, 0].item() == pytest.approx(-math.log(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scored_matches_log_softmax_in_value_entropy_and_gradient(dtype):
    """`scored`'s own kernel (exp floored at e^-80, the softmax overwritten by the gradient)
    against torch's log_softmax in float64, with logits spanning over 200 nats, where the floor
    is hit; and a second backward through the same log-probs is refused."""
    from offpolicy.algorithms.logprobs import scored

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 300, generator=g) * 40).to(dtype)
    targets = torch.randint(0, 300, (3, 5), generator=g)
    targets[0, 0] = int(x[0, 0].float().argmin())  # a target far below the floor
    w = torch.randn(3, 5, generator=g)
    ours = x.clone().requires_grad_()
    lp, ent = scored(ours, targets, 0.7, entropy=True, entropy_grad=False, owned=False)
    (lp * w).sum().backward(retain_graph=True)
    exact = x.double().requires_grad_()
    ls = torch.log_softmax(exact / 0.7, -1)
    want = ls.gather(-1, targets[..., None]).squeeze(-1)
    (want * w).sum().backward()
    assert lp.dtype == torch.float32 and not ent.requires_grad
    assert torch.allclose(lp.double(), want, atol=1e-4, rtol=1e-6)
    assert want[0, 0] < -80 / 0.7  # the floor applies to the sum, not to the picked logit
    assert torch.allclose(ent.double(), -(ls.exp() * ls).sum(-1), atol=1e-4)
    # (a bf16 input gets its gradient rounded to bf16: 8 bits of mantissa)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours.grad.double(), exact.grad, atol=tol, rtol=tol)
    with pytest.raises(RuntimeError, match="second backward"):
        (lp * w).sum().backward()
