"""Advantage estimators over GRPO groups: pure numpy functions picked from `ADVANTAGES`.

Reads: rewards (B,) and group index (B,). Writes: nothing. Returns (B,) float32 advantages,
one per trajectory; the learner broadcasts them over the trajectory's policy tokens.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

AdvantageFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn
    return wrap


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
