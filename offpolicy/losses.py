"""Policy losses with off-policy corrections: pure functions picked from `LOSSES` by name.

Reads: `LossInputs` tensors. Writes: nothing. Each loss returns (scalar loss, metrics dict).
Shapes: B sequences x T target positions; `mask` is 1 on policy tokens and 0 on padding,
prompt and environment tokens. Losses average over the batch's policy tokens (token mean,
as in DAPO), so long and short completions weigh each token the same.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch


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


LossFn = Callable[..., tuple[torch.Tensor, dict]]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn
    return wrap


def check_loss_params(name: str, params: dict) -> None:
    """Raise ConfigError unless every key of `params` is a keyword of loss `name`."""
    from offpolicy.config import ConfigError

    allowed = [p for p in inspect.signature(LOSSES[name]).parameters if p != "inputs"]
    for key in params:
        if key not in allowed:
            raise ConfigError(f"loss.params.{key}: not a parameter of loss '{name}'; "
                              f"valid: {', '.join(allowed) or '(none)'}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


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
    return loss, {"is/clip_frac": clipped.item()}


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
            "is/ratio_mean": (w.sum() / n).item(),
            "is/ratio_max": ratio.masked_fill(mask == 0, 0).max().item(),
            "is/ess_frac": ess.item(),
            # KL(mu || pi) estimators on samples from mu: k1 = -log r, k3 = r - 1 - log r.
            "is/kl_k1": masked_mean(-log_ratio, mask).item(),
            "is/kl_k3": masked_mean(ratio - 1 - log_ratio, mask).item(),
        }
