"""Advantage estimators over GRPO groups: pure numpy functions picked from `ADVANTAGES`.

Reads: rewards (E,) and group index (E,), one per episode. Writes: nothing. Returns (E,)
float32 advantages, one per episode; `episode_advantages` gives them to the episode's rows (its
segments), and the learner broadcasts a row's over its policy tokens. Group-relative
estimators compare the episodes of a group; `GroupAdvantage.rows` then lets `learner.credit`
(credit.py) vary the advantage along an episode's segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from offpolicy.algorithms.credit import Credit
from offpolicy.core.registry import Registry

AdvantageFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
ADVANTAGES: Registry[AdvantageFn] = Registry("learner.advantage")
register_advantage = ADVANTAGES.register  # @register_advantage("name") on fn(rewards, groups)


def episode_advantages(fn: Callable, rows: np.ndarray, rewards: np.ndarray, groups: np.ndarray,
                       row_log_w: np.ndarray | None = None,
                       row_lengths: np.ndarray | None = None, **params) -> np.ndarray:
    """(B,) each row's advantage: `fn` over the episodes (`rewards`, `groups`: (E,)), given to
    every row of each (`rows`: (B,) the row's episode index). A loss's own estimator also takes
    each episode's summed log-weight and policy-token count, from the rows' (`row_log_w`,
    `row_lengths`)."""
    if row_log_w is None:
        adv = fn(rewards, groups, **params)
    else:
        n = len(rewards)
        adv = fn(rewards, groups, np.bincount(rows, row_log_w, n),
                 np.bincount(rows, row_lengths, n), **params)
    return np.asarray(adv, dtype=np.float32)[rows]


def _group_stats(rewards: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-trajectory group mean, group population std and group size."""
    n = np.bincount(groups).astype(np.float64)
    mean = np.bincount(groups, weights=rewards) / n
    var = np.bincount(groups, weights=(rewards - mean[groups]) ** 2) / n
    return mean[groups], np.sqrt(var)[groups], n[groups]


@register_advantage("grpo")
def grpo(rewards: np.ndarray, groups: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(r - group mean) / (group std + eps). Shao et al. 2024 (DeepSeekMath)."""
    mean, std, _ = _group_stats(rewards, groups)
    return ((rewards - mean) / (std + eps)).astype(np.float32)


@register_advantage("dr_grpo")
def dr_grpo(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """r - group mean, no std division. Liu et al. 2025 (Dr. GRPO)."""
    mean, _, _ = _group_stats(rewards, groups)
    return (rewards - mean).astype(np.float32)


@register_advantage("rloo")
def rloo(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """r - mean of the other group members (leave one out). Ahmadian et al. 2024."""
    mean, _, n = _group_stats(rewards, groups)
    out = (rewards - mean) * n / np.maximum(n - 1, 1)
    return out.astype(np.float32)


@register_advantage("reinforce")
def reinforce(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """r - batch mean (one baseline for the whole batch)."""
    return (rewards - rewards.mean()).astype(np.float32)


# Advantages that belong to one loss (`register_loss(..., advantage=...)`): they take the
# loss's parameters, and `log_w`, each row's summed log(pi_prox / mu) over its policy tokens
# (the sequence importance weight's log), and `lengths`, its policy-token count.

def oapl_advantage(rewards: np.ndarray, groups: np.ndarray, log_w: np.ndarray,
                   lengths: np.ndarray, beta_v: float = 1.0) -> np.ndarray:
    """r - V*, with V* = beta_v * log(mean over the group of exp(r / beta_v)): the value of the
    KL-regularised optimal policy (a soft maximum, between the group mean and max).
    Source: OAPL (arXiv 2602.19362); reference code danieldritter/OAPL (beta_v 1.0)."""
    z = rewards / beta_v
    top = np.full(groups.max() + 1, -np.inf)
    np.maximum.at(top, groups, z)  # per-group max, for a stable log-mean-exp
    n = np.bincount(groups).astype(np.float64)
    lme = np.log(np.bincount(groups, weights=np.exp(z - top[groups])) / n) + top
    return (rewards - beta_v * lme[groups]).astype(np.float32)


def asymre_advantage(rewards: np.ndarray, groups: np.ndarray, log_w: np.ndarray,
                     lengths: np.ndarray, delta: float = -0.1) -> np.ndarray:
    """r - (group mean + delta): REINFORCE whose baseline sits `delta` below (delta < 0) the
    behaviour policy's value estimate, so positive rewards weigh more than negative ones.
    Source: Arnal et al. 2025, Asymmetric REINFORCE (arXiv 2506.20520); delta -0.1 as in
    Trinity-RFT's implementation."""
    mean, _, _ = _group_stats(rewards, groups)
    return (rewards - mean - delta).astype(np.float32)


def vcpo_advantage(rewards: np.ndarray, groups: np.ndarray, log_w: np.ndarray,
                   lengths: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(r - b*) / (group std + eps) with VCPO's minimum-variance off-policy baseline per group,
    b* = sum_i w_i^2 g_i r_i / sum_i w_i^2 g_i, where w_i is the sequence's importance weight
    pi_prox / mu and g_i = |grad log pi(y_i)|^2. The paper computes g_i with a backward pass per
    sequence; here g_i is taken proportional to the sequence's length (the squared norm of a
    sum of roughly independent per-token gradients), an approximation that needs no extra
    backward. Weights enter only through ratios within a group, so they are normalised by the
    group's largest (stable for any staleness).
    Source: VCPO (arXiv 2602.17616), off-policy optimal baseline (OPOB)."""
    top = np.full(groups.max() + 1, -np.inf)
    np.maximum.at(top, groups, log_w)
    w2g = np.exp(2 * (log_w - top[groups])) * np.maximum(lengths, 1)
    baseline = (np.bincount(groups, weights=w2g * rewards) / np.bincount(groups, weights=w2g))
    _, std, _ = _group_stats(rewards, groups)
    return ((rewards - baseline[groups]) / (std + eps)).astype(np.float32)


@dataclass(frozen=True)
class GroupAdvantage:
    """The advantages of one group's episodes, for batches sized in rows (the buffer computes
    them as a group arrives, before its rows are spread over learner steps): `fn` over the
    episodes' rewards. A loss's own estimator (`own`) gets log-weights of 0 (the buffer makes no
    proximal pass) and each episode's policy tokens, with the loss's `params`."""

    fn: Callable
    own: bool = False
    params: dict = field(default_factory=dict)
    credit: Credit = field(default_factory=Credit)
    """How each episode's advantage is spread over its segments (`learner.credit`)."""

    def __call__(self, rewards: np.ndarray, policy_tokens: np.ndarray) -> np.ndarray:
        """(E,) advantages of the group's E episodes."""
        groups = np.zeros(len(rewards), dtype=np.int64)
        if not self.own:
            return np.asarray(self.fn(rewards, groups, **self.params), dtype=np.float32)
        return np.asarray(self.fn(rewards, groups, np.zeros(len(rewards)), policy_tokens,
                                  **self.params), dtype=np.float32)

    def rows(self, rewards: np.ndarray, policy_tokens: np.ndarray, scores: list[np.ndarray],
             contexts: list[list[bytes]] | None = None) -> list[np.ndarray]:
        """One (T_i,) array per episode: its segments' advantages (`credit`), from the
        episodes' advantages and each segment's (step reward, proxy) `scores` (T_i, 2)."""
        return self.credit(self(rewards, policy_tokens), scores, contexts)
