"""Policy losses with off-policy corrections: pure functions, registered by name in `LOSSES`.

Reads: `LossInputs` tensors. Writes: nothing. `LOSSES[name]` is a `LossSpec`: the function,
its own advantage estimator if it has one, whether that needs the proximal pass, and its
parameters; the learner resolves it once. Each loss returns (scalar loss, metrics): the
metrics are 0-dim tensors without gradient, which the learner turns into numbers once per step
(a `.item()` per metric would be one host sync each on a GPU).
Shapes: B sequences x T target positions; `mask` is 1 on policy tokens and 0 on padding,
prompt and environment tokens. Losses average over the batch's policy tokens (token mean,
as in DAPO), so long and short completions weigh each token the same, and an episode split into
segments (one row each) weighs exactly what it would as one row. The sequence-level losses
(gspo, oapl, vcpo) average over rows instead, each row weighted by `row_weights` (1 / its
episode's segments), so there too an episode weighs the same however it is split.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from offpolicy.algorithms.advantages import (ADVANTAGES, GroupAdvantage, asymre_advantage,
                                            oapl_advantage, vcpo_advantage)
from offpolicy.algorithms.credit import Credit
from offpolicy.core.errors import ConfigError
from offpolicy.core.registry import Registry


@dataclass
class LossInputs:
    logprobs: torch.Tensor
    """(B, T) log-probs of the taken tokens under the current policy (requires grad)."""
    behavior_logprobs: torch.Tensor
    """(B, T) log-probs under the policy that sampled them (from the engine)."""
    advantages: torch.Tensor
    """(B, T) advantage of each token (a sequence's advantage broadcast over its tokens)."""
    mask: torch.Tensor
    """(B, T) 1.0 on tokens that count, 0.0 elsewhere."""
    proximal_logprobs: torch.Tensor | None = None
    """(B, T) log-probs under the weights at the start of the step, for decoupled losses."""
    row_weights: torch.Tensor | None = None
    """(B,) each row's weight in losses that average over rows (None: 1 each)."""


LossFn = Callable[..., tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss and everything the learner needs to know about it, resolved once."""

    name: str
    fn: LossFn
    """`fn(inputs, **params) -> (scalar loss, metrics as 0-dim detached tensors)`."""
    advantage: Callable | None = None
    """The loss's own advantage estimator, replacing `learner.advantage`:
    `advantage(rewards, groups, log_w, lengths, **params)` over the whole batch
    (`offpolicy.algorithms.advantages`)."""
    proximal: bool = False
    """Whether `advantage` needs the proximal policy's log-probs (`log_w`) before the first
    update: an extra forward pass per batch when `learner.minibatches` is 1."""

    def __call__(self, inputs: LossInputs, **params) -> tuple[torch.Tensor, dict]:
        return self.fn(inputs, **params)

    @property
    def params(self) -> list[str]:
        """The loss function's keyword parameters (`loss.params.<name>`)."""
        return list(inspect.signature(self.fn).parameters)[1:]

    @property
    def advantage_params(self) -> list[str]:
        """Its own advantage estimator's keyword parameters (also under `loss.params`)."""
        return list(inspect.signature(self.advantage).parameters)[4:] if self.advantage else []

    def split(self, params: dict) -> tuple[dict, dict]:
        """`loss.params` split into (the loss function's, its advantage estimator's)."""
        own = set(self.advantage_params)
        return ({k: v for k, v in params.items() if k not in own},
                {k: v for k, v in params.items() if k in own})

    def check(self, params: dict) -> None:
        """Raise ConfigError unless every key of `params` is one of this loss's parameters."""
        allowed = self.params + self.advantage_params
        for key in params:
            if key not in allowed:
                raise ConfigError(f"loss.params.{key}: not a parameter of loss '{self.name}'; "
                                  f"valid: {', '.join(allowed) or '(none)'}")


LOSSES: Registry[LossSpec] = Registry("loss.name")


def register_loss(name: str, advantage: Callable | None = None,
                  proximal: bool = False) -> Callable[[LossFn], LossFn]:
    """`@register_loss("name")` on `fn(inputs: LossInputs, **params)`; `advantage=` for a loss
    with its own estimator, `proximal=True` if that estimator needs `log_w`."""
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = LossSpec(name, fn, advantage, proximal)
        return fn
    return wrap


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def row_mean(x: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """The mean of (B,) per-row values over rows with policy tokens, weighted by
    `inputs.row_weights`."""
    w = (inputs.mask.sum(-1) > 0).float()
    if inputs.row_weights is not None:
        w = w * inputs.row_weights
    return (x * w).sum() / w.sum().clamp(min=1e-12)


@register_loss("pg")
def pg(inputs: LossInputs) -> tuple[torch.Tensor, dict]:
    """Plain policy gradient, no off-policy correction: -A * log pi(a)."""
    loss = masked_mean(-inputs.advantages * inputs.logprobs, inputs.mask)
    return loss, {}


@register_loss("tis")
def tis(inputs: LossInputs, cap: float = 2.0) -> tuple[torch.Tensor, dict]:
    """Token-level truncated importance sampling: -min(pi/mu, C) * A * log pi(a).

    The weight pi/mu corrects for tokens sampled by an older (or numerically different) policy
    mu; truncating it at C bounds the variance. The weight is a constant of the gradient.
    Source: Espeholt et al. 2018 (IMPALA, truncated rho); Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training" (TIS, C = 2).
    """
    ratio = torch.exp(inputs.logprobs.detach() - inputs.behavior_logprobs)
    weight = ratio.clamp(max=cap)
    loss = masked_mean(-weight * inputs.advantages * inputs.logprobs, inputs.mask)
    clipped = masked_mean((ratio > cap).float(), inputs.mask)
    return loss, {"is/clip_frac": clipped}


def _ratio(inputs: LossInputs) -> torch.Tensor:
    """(B, T) pi/mu with gradient through pi; 1 on masked positions (log-ratio zeroed there)."""
    return torch.exp((inputs.logprobs - inputs.behavior_logprobs) * inputs.mask)


def _seq_log_ratio(inputs: LossInputs, mean: bool) -> torch.Tensor:
    """(B,) sum (or length-normalised mean) of log pi/mu over each sequence's tokens."""
    log_r = ((inputs.logprobs - inputs.behavior_logprobs) * inputs.mask).sum(-1)
    return log_r / inputs.mask.sum(-1).clamp(min=1.0) if mean else log_r


def _dual_clip(obj: torch.Tensor, adv: torch.Tensor, c: float) -> torch.Tensor:
    """For negative advantages floor the objective at c * A (no gradient there); c <= 0: off."""
    if c <= 0:
        return obj
    return torch.where(adv < 0, torch.maximum(obj, c * adv), obj)


@register_loss("ppo_clip")
def ppo_clip(inputs: LossInputs, eps_low: float = 0.2, eps_high: float = 0.28,
             dual_clip: float = 3.0):
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = pi/mu; for A < 0 the objective
    is also floored at dual_clip * A, so a huge ratio cannot pass through the unclipped branch.

    The behaviour policy plays PPO's old policy. Sources: Schulman et al. 2017 (PPO, eps 0.2);
    Yu et al. 2025 (DAPO, clip-higher eps_high = 0.28); Ye et al. 2020 (dual-clip, c = 3).
    """
    r, adv = _ratio(inputs), inputs.advantages
    clipped = r.clamp(1 - eps_low, 1 + eps_high) * adv
    obj = _dual_clip(torch.minimum(r * adv, clipped), adv, dual_clip)
    frac = masked_mean((clipped < r * adv).float(), inputs.mask)
    return masked_mean(-obj, inputs.mask), {"is/clip_frac": frac}


@register_loss("seq_mask_is")
def seq_mask_is(inputs: LossInputs, low: float = 0.5, high: float = 2.0):
    """Drop whole sequences whose geometric-mean ratio exp(mean log r) leaves [low, high];
    the kept ones get token weights r (no gradient through r).

    Source: Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
    Training-Inference Mismatch" (sequence-level masked IS, geometric-mean variant).
    """
    seq_r = torch.exp(_seq_log_ratio(inputs, mean=True)).detach()                  # (B,)
    keep = ((seq_r >= low) & (seq_r <= high)).float()[:, None] * inputs.mask      # (B, T)
    w = _ratio(inputs).detach()
    loss = masked_mean(-w * keep * inputs.advantages * inputs.logprobs, inputs.mask)
    return loss, {"is/clip_frac": 1 - (keep.sum() / inputs.mask.sum().clamp(min=1))}


@register_loss("icepop")
def icepop(inputs: LossInputs, low: float = 0.5, high: float = 5.0):
    """Mask tokens whose ratio r = pi/mu leaves [low, high]; kept tokens get weight r.

    Source: Ling Team 2025, "Every Step Evolves: Scaling RL for Trillion-Scale Thinking Model"
    (IcePop, alpha = 0.5, beta = 5).
    """
    w = _ratio(inputs).detach()
    keep = ((w >= low) & (w <= high)).float() * inputs.mask
    loss = masked_mean(-w * keep * inputs.advantages * inputs.logprobs, inputs.mask)
    return loss, {"is/clip_frac": 1 - (keep.sum() / inputs.mask.sum().clamp(min=1))}


@register_loss("vtrace")
def vtrace(inputs: LossInputs, rho_bar: float = 1.0, c_bar: float = 1.0):
    """Token weight min(r_t, rho_bar) * prod_{i > t} min(r_i, c_bar): V-trace's truncated rho on
    the token times the truncated traces of the tokens after it in the sequence.

    With a terminal reward and a constant baseline the V-trace target of token t is reached
    only through the later tokens, each cut at c_bar. Source: Espeholt et al. 2018 (IMPALA,
    rho_bar = c_bar = 1).
    """
    r = _ratio(inputs).detach()
    log_c = torch.log(r.clamp(max=c_bar)) * inputs.mask                          # (B, T)
    # Sum of log c over positions after t: reverse cumulative sum, minus the position itself.
    after = log_c.flip(-1).cumsum(-1).flip(-1) - log_c
    w = r.clamp(max=rho_bar) * torch.exp(after)
    loss = masked_mean(-w * inputs.advantages * inputs.logprobs, inputs.mask)
    return loss, {"is/clip_frac": masked_mean((r > rho_bar).float(), inputs.mask)}


@register_loss("decoupled_ppo")
def decoupled_ppo(inputs: LossInputs, eps: float = 0.2, behav_cap: float = 0.0):
    """-(pi_prox / mu) * min(r A, clip(r, 1 - eps, 1 + eps) A) with r = pi / pi_prox.

    The proximal policy is the learner's weights at the start of the step: the clip keeps the
    update near it, and the behaviour weight pi_prox/mu (capped at behav_cap when > 0) corrects
    for stale samples. Source: Fu et al. 2025 (AReaL, decoupled PPO objective, eps 0.2).
    """
    prox = inputs.proximal_logprobs
    if prox is None:  # one update per batch: the step-start weights are the current ones
        prox = inputs.logprobs.detach()
    behav = torch.exp((prox - inputs.behavior_logprobs) * inputs.mask)
    if behav_cap > 0:
        behav = behav.clamp(max=behav_cap)
    r = torch.exp((inputs.logprobs - prox) * inputs.mask)
    adv = inputs.advantages
    clipped = r.clamp(1 - eps, 1 + eps) * adv
    obj = behav * torch.minimum(r * adv, clipped)
    frac = masked_mean((clipped < r * adv).float(), inputs.mask)
    return masked_mean(-obj, inputs.mask), {"is/clip_frac": frac}


@register_loss("m2po")
def m2po(inputs: LossInputs, tau: float = 0.04):
    """Mask the tokens with the largest (log r)^2 until the kept tokens' mean (log r)^2 (the
    second moment) is at most tau; kept tokens use the unclipped surrogate r A.

    Source: Zheng et al. 2025, "Prosperity before Collapse: How Far Can Off-Policy RL Reach
    with Stale Data on LLMs?" (M2PO, tau = 0.04).
    """
    with torch.no_grad():
        sq = ((inputs.logprobs - inputs.behavior_logprobs) ** 2)[inputs.mask.bool()]  # (N,)
        order = sq.sort(descending=True).values
        n = len(order)
        # Keeping the n - k smallest: their mean is tail_sum[k] / (n - k).
        tail = order.flip(0).cumsum(0).flip(0)
        counts = torch.arange(n, 0, -1, dtype=sq.dtype, device=sq.device)
        ok = (tail / counts) <= tau
        # k: how many of the largest to drop (n if none is small enough); no host sync
        k = torch.where(ok.any(), ok.float().argmax(), n) if n else torch.tensor(0)
        cut = (torch.where(k > 0, order[(k - 1).clamp(min=0)], float("inf")) if n
               else torch.tensor(float("inf")))
        drop = ((inputs.logprobs - inputs.behavior_logprobs) ** 2 >= cut) & inputs.mask.bool()
        keep = inputs.mask * (~drop).float()
    r = torch.exp((inputs.logprobs - inputs.behavior_logprobs) * keep)
    loss = masked_mean(-r * inputs.advantages * keep, inputs.mask)
    return loss, {"is/clip_frac": 1 - (keep.sum() / inputs.mask.sum().clamp(min=1))}


@register_loss("cispo")
def cispo(inputs: LossInputs, eps_low: float = 1.0, eps_high: float = 0.28):
    """-clip(r, 1 - eps_low, 1 + eps_high) * A * log pi, the clipped weight without gradient:
    every token keeps a gradient, only its IS weight is bounded.

    Source: MiniMax 2025 (MiniMax-M1, CISPO; no lower bound in practice, eps_low = 1).
    """
    r = _ratio(inputs).detach()
    w = r.clamp(1 - eps_low, 1 + eps_high)
    loss = masked_mean(-w * inputs.advantages * inputs.logprobs, inputs.mask)
    return loss, {"is/clip_frac": masked_mean((w != r).float(), inputs.mask)}


@register_loss("gspo")
def gspo(inputs: LossInputs, eps_low: float = 3e-4, eps_high: float = 4e-4,
         dual_clip: float = 3.0):
    """Sequence-level PPO on s = exp(mean_t log r_t) (length-normalised ratio), averaged over
    sequences: -mean_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), with the same
    dual-clip floor as `ppo_clip` for negative advantages.

    Source: Zheng et al. 2025 (Qwen, GSPO, eps 3e-4 / 4e-4); Ye et al. 2020 (dual-clip).
    """
    s = torch.exp(_seq_log_ratio(inputs, mean=True))                              # (B,)
    adv = (inputs.advantages * inputs.mask).sum(-1) / inputs.mask.sum(-1).clamp(min=1)
    clipped = s.clamp(1 - eps_low, 1 + eps_high) * adv
    obj = _dual_clip(torch.minimum(s * adv, clipped), adv, dual_clip)
    frac = row_mean((clipped < s * adv).float(), inputs)
    return row_mean(-obj, inputs), {"is/clip_frac": frac}


@register_loss("topr")
def topr(inputs: LossInputs):
    """Tapered off-policy REINFORCE: sequences with A >= 0 get weight 1 (no IS), sequences with
    A < 0 get the sequence ratio clipped to [0, 1]; the weight carries no gradient.

    Source: Le Roux et al. 2025, "Tapered Off-Policy REINFORCE" (TOPR).
    """
    seq_r = torch.exp(_seq_log_ratio(inputs, mean=False).clamp(max=0.0)).detach()  # (B,) <= 1
    negative = (inputs.advantages < 0).float()
    w = negative * seq_r[:, None] + (1 - negative)
    loss = masked_mean(-w * inputs.advantages * inputs.logprobs, inputs.mask)
    return loss, {"is/clip_frac": masked_mean(negative * (seq_r[:, None] < 1).float(),
                                                   inputs.mask)}


def _seq_advantage(inputs: LossInputs) -> torch.Tensor:
    """(B,) each sequence's advantage (the learner broadcasts one per sequence)."""
    return (inputs.advantages * inputs.mask).sum(-1) / inputs.mask.sum(-1).clamp(min=1)


@register_loss("oapl", advantage=oapl_advantage)
def oapl(inputs: LossInputs, beta: float = 0.1):
    """Squared regression of the sequence log-ratio to the behaviour policy onto the optimal
    advantage, no importance weights: mean_i (beta * sum_t log(pi / mu) - A_i)^2 over
    sequences, with A_i = r_i - V* (`oapl_advantage`, parameter `beta_v`). Its minimiser is
    pi = mu * exp(A / beta): a KL-regularised step away from whatever (lagged) policy sampled
    the data, so staleness moves the anchor instead of blowing up a ratio.
    Source: OAPL (arXiv 2602.19362). The reference code uses beta 0.001 with lr 1e-6 and
    completions of thousands of tokens; the gradient's size is about 2 beta times the tokens
    per sequence relative to `pg`'s, hence 0.1 for this framework's short answers.
    `is/clip_frac` here is the share of sequences whose log-ratio already overshoots its target
    (beta * s beyond A, so the gradient pulls it back).
    """
    s = _seq_log_ratio(inputs, mean=False)                                        # (B,)
    adv = _seq_advantage(inputs)
    err = beta * s - adv
    over = ((err * adv.sign() > 0) & (adv != 0)).float()
    return row_mean(err ** 2, inputs), {"is/clip_frac": row_mean(over, inputs)}


@register_loss("asymre", advantage=asymre_advantage)
def asymre(inputs: LossInputs):
    """Off-policy REINFORCE with an asymmetric baseline, no importance weights:
    -A * log pi(a) (token mean), with A = r - (group mean + delta) (`asymre_advantage`,
    parameter `delta`, default -0.1: the baseline sits below the behaviour policy's value).
    Source: Arnal et al. 2025, "Asymmetric REINFORCE for off-policy RL" (arXiv 2506.20520).
    """
    return masked_mean(-inputs.advantages * inputs.logprobs, inputs.mask), {}


@register_loss("vcpo", advantage=vcpo_advantage, proximal=True)
def vcpo(inputs: LossInputs, cap: float = 8.0):
    """-mean_i [min(w_i, cap) * A_i * mean_t (pi / pi_prox)], sequence mean of token means:
    w_i = exp(sum_t log(pi_prox / mu)) is the sequence's importance weight, truncated at `cap`
    (no gradient), pi_prox the weights at the start of the batch, and A_i uses VCPO's
    minimum-variance off-policy baseline (`vcpo_advantage`). VCPO's other half, scaling the
    learning rate by the batch's effective sample size, is `learner.ess_lr: sqrt`.
    Source: VCPO (arXiv 2602.17616); reference code mit-han-lab/vcpo (truncation 8, no clip).
    """
    prox = inputs.proximal_logprobs
    if prox is None:
        prox = inputs.logprobs.detach()
    log_w = ((prox - inputs.behavior_logprobs) * inputs.mask).sum(-1)             # (B,)
    w = torch.exp(log_w.clamp(max=math.log(cap)))
    r = torch.exp((inputs.logprobs - prox) * inputs.mask)
    token_mean = (r * inputs.mask).sum(-1) / inputs.mask.sum(-1).clamp(min=1)
    loss = row_mean(-w * _seq_advantage(inputs) * token_mean, inputs)
    return loss, {"is/clip_frac": row_mean((log_w > math.log(cap)).float(), inputs)}


def importance_diagnostics(logprobs: torch.Tensor, behavior_logprobs: torch.Tensor,
                           mask: torch.Tensor) -> dict[str, float]:
    """`is/` metrics of the ratio pi/mu over policy tokens: mean, max, ESS fraction, KL."""
    with torch.no_grad():
        log_ratio = (logprobs - behavior_logprobs) * mask
        ratio = torch.exp(log_ratio)
        n = mask.sum().clamp(min=1.0)
        w = ratio * mask
        # Normalised effective sample size (sum w)^2 / (n * sum w^2), in (0, 1].
        ess = w.sum() ** 2 / (n * (w ** 2).sum()).clamp(min=1e-12)
        return {
            "is/ratio_mean": (w.sum() / n),
            "is/ratio_max": ratio.masked_fill(mask == 0, 0).max(),
            "is/ess_frac": ess,
            # KL(mu || pi) estimators on samples from mu: k1 = -log r, k3 = r - 1 - log r.
            "is/kl_k1": masked_mean(-log_ratio, mask),
            "is/kl_k3": masked_mean(ratio - 1 - log_ratio, mask),
        }


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: str = "k3") -> torch.Tensor:
    """(B, T) per-token estimate of KL(pi || pi_ref) on sampled tokens, differentiable in
    `logprobs`. With log r = log pi_ref - log pi: k1 = -log r, k2 = (log r)^2 / 2,
    k3 = r - 1 - log r (Schulman 2020, "Approximating KL divergence"; k3 is GRPO's)."""
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"unknown KL estimator '{estimator}'; valid: k1, k2, k3")


def regularized(loss: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor,
                entropy_coef: float = 0.0, kl: torch.Tensor | None = None,
                kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Any registry loss plus the regularisers every loss shares: `loss - entropy_coef * H +
    kl_coef * KL`, both token means over policy tokens. Returns (loss, metrics):
    `learner/entropy` always, `kl/ref` when a per-token KL is given."""
    ent = masked_mean(entropy, mask)
    metrics = {"learner/entropy": ent.detach()}
    if entropy_coef:
        loss = loss - entropy_coef * ent
    if kl is not None:
        kl_mean = masked_mean(kl, mask)
        metrics["kl/ref"] = kl_mean.detach()
        if kl_coef:
            loss = loss + kl_coef * kl_mean
    return loss, metrics


def group_advantage(loss: str, loss_params: dict, advantage: str,
                    credit: Credit = Credit()) -> GroupAdvantage:
    """What the buffer computes each row's advantage with when batches are sized in rows: the
    loss's own estimator (with its parameters), or `learner.advantage`'s, spread over each
    episode's segments by `credit`."""
    spec = LOSSES.lookup(loss)
    if spec.advantage is None:
        return GroupAdvantage(ADVANTAGES.lookup(advantage), credit=credit)
    return GroupAdvantage(spec.advantage, own=True, params=spec.split(loss_params)[1],
                          credit=credit)
