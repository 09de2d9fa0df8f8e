"""The learning rate of one update: the schedule (`learner.lr_schedule`, warm-up included) and
the factor the rows' effective sample size gives it (`learner.ess_lr`).

Reads: nothing. Writes: nothing.
"""

from __future__ import annotations

import math

import torch


def lr_at(lc, version: int) -> float:
    """The learning rate of the update that takes the policy from `version` to `version + 1`
    under `learner.lr_schedule` (warm-up, then constant or decaying to lr * min_lr_ratio)."""
    if version < lc.warmup_steps:
        return lc.lr * (version + 1) / lc.warmup_steps
    if lc.lr_schedule == "constant":
        return lc.lr
    span = max(lc.steps - lc.warmup_steps, 1)
    done = min((version - lc.warmup_steps) / span, 1.0)
    shape = 1 - done if lc.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done))
    return lc.lr * (lc.min_lr_ratio + (1 - lc.min_lr_ratio) * shape)


def ess_scale(lc, log_w: torch.Tensor) -> float:
    """`learner.ess_lr`: the learning rate's factor from the effective sample size of the rows'
    sequence weights w = pi_prox / mu, given as (n,) log w (rows with loss tokens only):
    ESS / n = (sum w)^2 / (n sum w^2); min(1, ESS / n / ess_lr_base), square-rooted for `sqrt`
    (VCPO, arXiv 2602.17616)."""
    log_w = log_w.double()
    if not len(log_w):
        return 1.0
    frac = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    rho = min(1.0, float(frac) / len(log_w) / lc.ess_lr_base)
    return math.sqrt(rho) if lc.ess_lr == "sqrt" else rho
