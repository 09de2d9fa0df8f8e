"""Credit assignment along a long episode: how a group's episode advantages become one
advantage per segment row (`learner.credit`). Pure numpy functions, one per scheme.

Reads: each episode's advantage A_i (from `learner.advantage` or the loss's own estimator, over
the group's episode rewards) and, per segment t of episode i, the environment's step reward
r_it, its proxy score p_it and its context. Writes: nothing. Returns one (T_i,) float32 array
per episode. Every scheme keeps the episode's advantage as its base term, so with one segment
per episode they all reduce to it. docs/losses.md ("Credit along an episode") has the formulas.

- `broadcast`: A_it = A_i. Every segment gets the episode's advantage (what peers do).
- `dense`: A_it = (1 - w) A_i + w P_it, where P_it normalises the proxy p_it among the group's
  segments at the same call index t: (p_it - mean_t) / (std_t + eps). MT-GRPO's turn-level
  advantage (Zeng et al. 2025, arXiv 2505.11821), at every call rather than the first.
- `gigpo`: A_it = (1 - w) A_i + w S_it, where S_it normalises the discounted return from
  segment t, R_it = sum_{k >= t} gamma^(k - t) r_ik, among the segments of the group with
  the same context (an "anchor state"), wherever in their episodes they sit; a context seen
  once has S = 0. GiGPO (Feng et al. 2025, arXiv 2505.10978) writes A_i + omega S_it; the
  mix here is that with omega = w / (1 - w), scaled by (1 - w), which AdamW's update hardly
  sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CREDITS = ("broadcast", "dense", "gigpo")


def _normalised(values: np.ndarray, keys: np.ndarray, eps: float) -> np.ndarray:
    """(values - mean of its key) / (std of its key + eps); 0 where a key has one member."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, values) / counts
    var = np.bincount(inverse, (values - mean[inverse]) ** 2) / counts
    out = (values - mean[inverse]) / (np.sqrt(var)[inverse] + eps)
    return np.where(counts[inverse] > 1, out, 0.0)


def broadcast(adv: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    """The episode's advantage on each of its segments."""
    return [np.full(n, a, np.float32) for a, n in zip(adv, lengths)]


def dense(adv: np.ndarray, proxies: list[np.ndarray], weight: float,
          eps: float = 1e-6) -> list[np.ndarray]:
    """(1 - w) A_i + w (p_it - mean_t) / (std_t + eps), the proxy normalised among the segments
    at the same call index t of the group's episodes."""
    flat = np.concatenate(proxies).astype(np.float64)
    index = np.concatenate([np.arange(len(p)) for p in proxies])
    step = np.split(_normalised(flat, index, eps), np.cumsum([len(p) for p in proxies])[:-1])
    return [((1 - weight) * a + weight * s).astype(np.float32) for a, s in zip(adv, step)]


def returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """R_t = sum_{k >= t} gamma^(k - t) r_k."""
    out, acc = np.zeros(len(rewards)), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


def gigpo(adv: np.ndarray, step_rewards: list[np.ndarray], contexts: list[list[bytes]],
          weight: float, gamma: float = 1.0, eps: float = 1e-6) -> list[np.ndarray]:
    """(1 - w) A_i + w (R_it - mean_s) / (std_s + eps), over the segments s of the group whose
    context is the same."""
    flat = np.concatenate([returns(r.astype(np.float64), gamma) for r in step_rewards])
    keys = {}
    index = np.array([keys.setdefault(c, len(keys)) for cs in contexts for c in cs])
    step = np.split(_normalised(flat, index, eps),
                    np.cumsum([len(r) for r in step_rewards])[:-1])
    return [((1 - weight) * a + weight * s).astype(np.float32) for a, s in zip(adv, step)]


@dataclass(frozen=True)
class Credit:
    """`learner.credit` with its weight and discount: episode advantages -> row advantages."""

    name: str = "broadcast"
    weight: float = 0.5
    gamma: float = 1.0

    def __call__(self, adv: np.ndarray, scores: list[np.ndarray],
                 contexts: list[list[bytes]] | None = None) -> list[np.ndarray]:
        """`adv` (E,) the episodes' advantages; `scores` one (T_i, 2) array per episode, each
        segment's step reward and proxy; `contexts` each segment's context (gigpo)."""
        if self.name == "broadcast":
            return broadcast(adv, [len(s) for s in scores])
        if self.name == "dense":
            return dense(adv, [s[:, 1] for s in scores], self.weight)
        return gigpo(adv, [s[:, 0] for s in scores], contexts, self.weight, self.gamma)
