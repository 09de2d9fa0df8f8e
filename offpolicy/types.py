"""The experience types every role shares: Trajectory (one episode) and Batch (one update).

Reads: nothing. Writes: nothing. Plain dataclasses of numpy arrays, cheap to pickle through Ray.
Everything here is framework-neutral (no torch) so the buffer never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trajectory:
    """One episode. Arrays over completion tokens all have length T = len(completion_ids)."""

    id: str
    group_id: str
    """The prompt this episode answered; GRPO normalises rewards within a group."""
    prompt_ids: np.ndarray
    """(P,) int32 token ids of the prompt."""
    completion_ids: np.ndarray
    """(T,) int32 every token after the prompt: policy tokens and any environment tokens."""
    loss_mask: np.ndarray
    """(T,) int8, 1 for tokens the policy sampled, 0 for tokens the environment inserted."""
    behavior_logprobs: np.ndarray
    """(T,) float32 log-prob of each token under the policy that sampled it (0 where masked)."""
    versions: np.ndarray
    """(T,) int32 policy version that produced each token (-1 where the environment did)."""
    reward: float
    env: str
    finish_reason: str
    """`stop` (end-of-sequence), `length` (token limit), or an environment reason."""
    timings: dict = field(default_factory=dict)
    """Seconds spent: `generate`, `env`."""
    info: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def nbytes(self) -> int:
        """Approximate memory held: the arrays plus the strings and a fixed object overhead
        (what `buffer.capacity_bytes` counts; dict fields are counted by their text only)."""
        arrays = (self.prompt_ids, self.completion_ids, self.loss_mask, self.behavior_logprobs,
                  self.versions)
        text = len(self.id) + len(self.group_id) + len(self.env) + len(self.finish_reason)
        return sum(a.nbytes for a in arrays) + text + len(repr(self.info)) + 600

    def min_version(self) -> int:
        """Oldest policy version among the policy tokens (what staleness bounds)."""
        policy = self.versions[self.loss_mask.astype(bool)]
        return int(policy.min()) if len(policy) else int(self.versions.max(initial=0))


@dataclass
class Batch:
    """The trajectories of one learner update, whole groups only, plus buffer statistics."""

    trajectories: list[Trajectory]
    version: int
    """Learner version of the update that consumes this batch."""
    stats: dict = field(default_factory=dict)
    """`buffer/...` metrics measured when the batch was sampled."""
    weights: np.ndarray | None = None
    """(B,) float32 importance weights of prioritized replay (None: all 1); the learner
    multiplies them into the advantages."""

    def __len__(self) -> int:
        return len(self.trajectories)

    def rewards(self) -> np.ndarray:
        return np.array([t.reward for t in self.trajectories], dtype=np.float32)

    def group_index(self) -> np.ndarray:
        """(B,) int64 index of each trajectory's group, numbered from 0 in order of appearance."""
        ids: dict[str, int] = {}
        return np.array([ids.setdefault(t.group_id, len(ids)) for t in self.trajectories])

    def padded(self, pad_id: int) -> dict[str, np.ndarray]:
        """Right-padded (B, L) arrays of prompt + completion, with per-target arrays (B, L-1).

        Target position j holds token j + 1 (predicted from the logits at position j), so the
        learner's `logits[:, :-1]` line up with `targets`, `loss_mask`, `behavior_logprobs`
        and `versions` without further shifting.
        """
        lengths = [t.num_tokens for t in self.trajectories]
        B, L = len(lengths), max(lengths)
        input_ids = np.full((B, L), pad_id, dtype=np.int64)
        attention = np.zeros((B, L), dtype=np.int64)
        mask = np.zeros((B, L - 1), dtype=np.float32)
        behavior = np.zeros((B, L - 1), dtype=np.float32)
        versions = np.full((B, L - 1), -1, dtype=np.int64)
        for i, t in enumerate(self.trajectories):
            P, T = len(t.prompt_ids), len(t.completion_ids)
            input_ids[i, :P] = t.prompt_ids
            input_ids[i, P:P + T] = t.completion_ids
            attention[i, :P + T] = 1
            # Completion token k sits at input position P + k, so its target index is P + k - 1.
            mask[i, P - 1:P - 1 + T] = t.loss_mask
            behavior[i, P - 1:P - 1 + T] = t.behavior_logprobs
            versions[i, P - 1:P - 1 + T] = t.versions
        return {"input_ids": input_ids, "attention_mask": attention,
                "targets": input_ids[:, 1:].copy(), "loss_mask": mask,
                "behavior_logprobs": behavior, "versions": versions}
