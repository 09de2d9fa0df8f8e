"""The data every role shares: Trajectory (one learner row: an episode, or one segment of a long
one), Batch (one update), PaddedBatch (its rows as arrays), Incarnation (one process of a
rollout actor).

Reads: nothing. Writes: nothing. Plain dataclasses of numpy arrays, cheap to pickle through Ray.
Everything here is framework-neutral (no torch) so the buffer never imports torch.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class Trajectory:
    """One learner row: a whole episode, or one segment of an episode made of several policy
    calls (each call with a context of its own; docs/long_episodes.md). Arrays over completion
    tokens all have length T = len(completion_ids)."""

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
    episode_id: str = ""
    """The episode this row is a segment of; empty when the row is a whole episode (`id`)."""
    segment: int = 0
    """This row's index among its episode's segments."""
    segments: int = 1
    """Segments in the whole episode (known when it ends)."""
    advantage: float | None = None
    """This row's advantage when the buffer computed it as the group arrived (batches sized
    in rows, `learner.batch_rows`; `learner.credit` decides how it varies along an episode);
    None: the learner computes it from the batch."""
    step_reward: float = 0.0
    """The environment's reward for this segment's call (a long episode's; the episode's
    `reward` is the sum of its calls')."""
    proxy: float = 0.0
    """The environment's per-call proxy score for this segment (`info["proxy"]`; 0 if none),
    for `learner.credit: dense`."""

    @property
    def episode(self) -> str:
        """The id of the episode this row belongs to."""
        return self.episode_id or self.id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def nbytes(self) -> int:
        """Approximate memory held: the arrays plus the strings and a fixed object overhead
        (what `buffer.capacity_bytes` counts; dict fields are counted by their text only)."""
        arrays = (self.prompt_ids, self.completion_ids, self.loss_mask, self.behavior_logprobs,
                  self.versions)
        text = (len(self.id) + len(self.group_id) + len(self.env) + len(self.finish_reason)
                + len(self.episode_id))
        return sum(a.nbytes for a in arrays) + text + len(repr(self.info)) + 600

    def min_version(self) -> int:
        """Oldest policy version among the policy tokens (what staleness bounds)."""
        policy = self.versions[self.loss_mask.astype(bool)]
        return int(policy.min()) if len(policy) else int(self.versions.max(initial=0))

    def policy_tokens(self) -> int:
        return int(self.loss_mask.sum())


def episode_index(trajectories: list[Trajectory]) -> np.ndarray:
    """(B,) int64 index of each row's episode, numbered from 0 in order of appearance."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(t.episode, len(ids)) for t in trajectories], dtype=np.int64)


_ARRAYS = ("prompt_ids", "completion_ids", "loss_mask", "behavior_logprobs", "versions")
_EPISODE_FIELDS = ("episode_id", "segment", "segments", "advantage", "step_reward", "proxy")


def pack(trajectories: list[Trajectory]) -> tuple:
    """Trajectories as five concatenated arrays, their lengths and one list of small fields.

    What crosses a process boundary: pickling 128 trajectories one array at a time made 640
    out-of-band buffers and cost about 6 ms each way; packed it is a handful of arrays.
    """
    arrays = {name: np.concatenate([getattr(t, name) for t in trajectories]) if trajectories
              else np.zeros(0, np.int32) for name in _ARRAYS}
    lengths = np.array([(len(t.prompt_ids), len(t.completion_ids)) for t in trajectories],
                       dtype=np.int64).reshape(-1, 2)
    small = [(t.id, t.group_id, t.reward, t.env, t.finish_reason, t.timings, t.info,
              t.episode_id, t.segment, t.segments, t.advantage, t.step_reward, t.proxy)
             for t in trajectories]
    return arrays, lengths, small


def unpack(packed: tuple) -> list[Trajectory]:
    """The inverse of `pack`; every array is its own copy (no view pins the packed buffer)."""
    arrays, lengths, small = packed
    ends = {"prompt_ids": np.cumsum(lengths[:, 0]), **{
        name: np.cumsum(lengths[:, 1]) for name in _ARRAYS[1:]}}
    out = []
    for i, (id, group_id, reward, env, finish, timings, info, *episode) in enumerate(small):
        parts = {}
        for name in _ARRAYS:
            end = int(ends[name][i])
            n = int(lengths[i, 0] if name == "prompt_ids" else lengths[i, 1])
            parts[name] = arrays[name][end - n:end].copy()
        out.append(Trajectory(id=id, group_id=group_id, reward=reward, env=env,
                              finish_reason=finish, timings=timings, info=info, **parts,
                              **dict(zip(_EPISODE_FIELDS, episode))))
    return out


@dataclass
class Segments:
    """Consecutive segments (rows) of one episode, packed: every row's arrays concatenated and
    one record for the episode. About 13 bytes a token where a Trajectory object costs some
    2 KB a row, so an episode of a million tokens fits in the buffer (docs/long_episodes.md).
    Segments travel from the actor to the buffer, and wait there, in this form."""

    episode_id: str
    group_id: str
    env: str
    first: int
    """The segment index of the first row."""
    arrays: dict[str, np.ndarray]
    """The five per-token arrays of `Trajectory`, the rows' concatenated."""
    lengths: np.ndarray
    """(n, 2) int64 each row's prompt and completion length."""
    reward: float = 0.0
    finish_reason: str = ""
    segments: int = 0
    """The whole episode's segments (known when it ends)."""
    scores: np.ndarray | None = None
    """(n, 2) float32 each row's `step_reward` and `proxy`."""
    advantages: np.ndarray | None = None
    """(n,) float32 each row's advantage, once the buffer computed them."""
    timings: dict = field(default_factory=dict)
    """The last row's (the episode's, when this holds its last segment)."""
    info: dict = field(default_factory=dict)
    """The last row's."""

    @classmethod
    def of(cls, rows: list[Trajectory]) -> "Segments":
        """Rows of one episode, consecutive segments, packed."""
        arrays, lengths, _ = pack(rows)
        last = rows[-1]
        scores = np.array([(t.step_reward, t.proxy) for t in rows], np.float32).reshape(-1, 2)
        advantages = None if any(t.advantage is None for t in rows) else \
            np.array([t.advantage for t in rows], np.float32)
        return cls(last.episode, last.group_id, last.env, rows[0].segment, arrays, lengths,
                   last.reward, last.finish_reason, last.segments, scores, advantages,
                   dict(last.timings), dict(last.info))

    @classmethod
    def joined(cls, chunks: list["Segments"]) -> "Segments":
        """Consecutive chunks of one episode as one: a few large arrays instead of many small
        ones (large arrays are mapped and unmapped whole, so the memory of an episode held for
        a long time does not fragment)."""
        last = chunks[-1]
        arrays = {name: np.concatenate([c.arrays[name] for c in chunks]) for name in _ARRAYS}
        advantages = None if any(c.advantages is None for c in chunks) else \
            np.concatenate([c.advantages for c in chunks])
        return cls(last.episode_id, last.group_id, last.env, chunks[0].first, arrays,
                   np.concatenate([c.lengths for c in chunks]), last.reward, last.finish_reason,
                   last.segments, np.concatenate([c.row_scores() for c in chunks]), advantages,
                   dict(last.timings), dict(last.info))

    def __len__(self) -> int:
        return len(self.lengths)

    def row_scores(self) -> np.ndarray:
        """(n, 2) each row's `step_reward` and `proxy` (zeros when none were recorded)."""
        return self.scores if self.scores is not None else np.zeros((len(self), 2), np.float32)

    def contexts(self) -> list[bytes]:
        """Each row's prompt (the context its call saw) as bytes: equal contexts, equal keys."""
        ends = np.cumsum(self.lengths[:, 0])
        ids = self.arrays["prompt_ids"]
        return [ids[e - n:e].tobytes() for e, n in zip(ends, self.lengths[:, 0])]

    @property
    def episode(self) -> str:
        return self.episode_id

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self.arrays.values()) + self.lengths.nbytes
                + len(repr(self.info)) + 600)

    def rows(self, start: int = 0, stop: int | None = None) -> list[Trajectory]:
        """Rows `start` to `stop` as Trajectories, with the episode's fields."""
        stop = len(self) if stop is None else stop
        ends = np.cumsum(self.lengths, axis=0)
        scores = self.row_scores()
        out = []
        for i in range(start, stop):
            (p0, c0), (p, c) = ends[i] - self.lengths[i], self.lengths[i]
            parts = {name: self.arrays[name][p0:p0 + p].copy() if name == "prompt_ids"
                     else self.arrays[name][c0:c0 + c].copy() for name in _ARRAYS}
            last = i == len(self) - 1
            seg = self.first + i
            out.append(Trajectory(
                id=f"{self.episode_id}/{seg}", group_id=self.group_id, reward=self.reward,
                env=self.env, finish_reason=self.finish_reason,
                timings=dict(self.timings) if last else {}, info=dict(self.info) if last else {},
                episode_id=self.episode_id, segment=seg, segments=self.segments,
                advantage=None if self.advantages is None else float(self.advantages[i]),
                step_reward=float(scores[i, 0]), proxy=float(scores[i, 1]), **parts))
        return out

    def policy_tokens(self) -> int:
        return int(self.arrays["loss_mask"].sum())

    def tokens(self) -> int:
        return int(self.lengths.sum())

    def version_range(self) -> tuple[int, int] | None:
        """(oldest, newest) version of the policy tokens; None without any."""
        v = self.arrays["versions"][self.arrays["loss_mask"].astype(bool)]
        return (int(v.min()), int(v.max())) if len(v) else None

    def last_min_version(self) -> int:
        """The oldest policy token of the last row (what the staleness bound measures)."""
        c = int(self.lengths[-1, 1])
        return self.rows(len(self) - 1)[0].min_version() if c else 0


class Groups(list):
    """A list of GRPO groups (lists of Trajectories) that pickles packed (see `pack`); it
    arrives as a plain list of lists."""

    def __reduce__(self):
        flat = [t for group in self for t in group]
        return _groups_from_packed, (pack(flat), [len(g) for g in self])


def _groups_from_packed(packed: tuple, sizes: list[int]) -> list[list[Trajectory]]:
    flat, groups, start = unpack(packed), [], 0
    for n in sizes:
        groups.append(flat[start:start + n])
        start += n
    return groups


@dataclass
class Batch:
    """The rows of one learner update, plus buffer statistics: whole groups (batches sized in
    groups), or rows whose advantages the buffer computed (`learner.batch_rows`)."""

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

    def __reduce__(self):  # packed across processes (see `pack`)
        return _batch_from_packed, (pack(self.trajectories), self.version, self.stats,
                                    self.weights)

    def rewards(self) -> np.ndarray:
        return np.array([t.reward for t in self.trajectories], dtype=np.float32)

    def group_index(self) -> np.ndarray:
        """(B,) int64 index of each trajectory's group, numbered from 0 in order of appearance."""
        ids: dict[str, int] = {}
        return np.array([ids.setdefault(t.group_id, len(ids)) for t in self.trajectories])

    def episodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(each row's episode index (B,), each episode's reward (E,), each episode's group
        index (E,)): group-relative advantages compare episodes, never segments."""
        rows = episode_index(self.trajectories)
        first = np.unique(rows, return_index=True)[1]         # each episode's first row
        return (rows, self.rewards()[first], self.group_index()[first])

    def given_advantages(self) -> np.ndarray | None:
        """(B,) float32 the advantages the buffer computed, or None if any row has none."""
        if any(t.advantage is None for t in self.trajectories):
            return None
        return np.array([t.advantage for t in self.trajectories], dtype=np.float32)

    def row_weights(self) -> np.ndarray:
        """(B,) float32 each row's weight in losses that average over rows: 1 / its episode's
        segments, so an episode weighs the same however many segments it was split into."""
        return np.array([1.0 / t.segments for t in self.trajectories], dtype=np.float32)

    def padded(self, pad_id: int) -> "PaddedBatch":
        """The batch as right-padded (B, L) arrays of prompt + completion, with per-target
        arrays (B, L-1) (see `PaddedBatch`)."""
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
        return PaddedBatch(input_ids=input_ids, attention_mask=attention,
                           prompt_lens=np.array([len(t.prompt_ids) for t in self.trajectories]),
                           targets=input_ids[:, 1:].copy(), loss_mask=mask,
                           behavior_logprobs=behavior, versions=versions,
                           row_weights=self.row_weights())


@dataclass
class PaddedBatch:
    """A batch's rows as right-padded arrays: numpy from `Batch.padded`, torch tensors in the
    learner (`map(torch.from_numpy)`). Target position j holds token j + 1 (predicted from the
    logits at position j), so a model's `logits[:, :-1]` line up with `targets`, `loss_mask`,
    `behavior_logprobs` and `versions` without further shifting."""

    input_ids: Any
    """(B, L) int64 prompt then completion, padded on the right."""
    attention_mask: Any
    """(B, L) int64, 1 on real tokens."""
    prompt_lens: Any
    """(B,) each row's prompt length."""
    targets: Any
    """(B, L-1) the token each position predicts."""
    loss_mask: Any
    """(B, L-1) float32, 1 on targets the policy sampled."""
    behavior_logprobs: Any
    """(B, L-1) float32 the engine's log-prob of each target (0 elsewhere)."""
    versions: Any
    """(B, L-1) int64 the policy version of each target (-1 elsewhere)."""
    row_weights: Any = None
    """(B,) each row's weight in losses that average over rows (`Batch.row_weights`)."""
    proximal_logprobs: Any = None
    """(B, L-1) log-probs under the weights at the start of the update, when the update scores
    them first (the learner's proximal pass); None otherwise."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def map(self, fn: Callable) -> "PaddedBatch":
        """The same batch with `fn` applied to every array (None stays None)."""
        return PaddedBatch(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v)
                              for f in dataclasses.fields(self)})

    def rows(self, index) -> "PaddedBatch":
        """The rows `index` selects, of every array."""
        return self.map(lambda a: a[index])


@dataclass(frozen=True)
class Incarnation:
    """One process of a rollout actor: its actor number and a fresh id per process start. A
    restarted actor is a new incarnation, so the buffer's ledger can tell a batch lost with a
    dead process from one still being generated."""

    actor: int
    uid: str

    @classmethod
    def new(cls, actor: int) -> "Incarnation":
        return cls(actor, uuid.uuid4().hex[:8])

    def __str__(self) -> str:
        return f"{self.actor}:{self.uid}"


def _batch_from_packed(packed: tuple, version: int, stats: dict, weights) -> Batch:
    return Batch(unpack(packed), version, stats, weights)
