"""Episodes being generated: their segments, and the threads their environment steps run on.

Reads: completions from the engine and the environment's answers. Writes: learner rows
(Trajectories), one per segment, tagged with the episode they belong to.

An `Episode` is one task instance played by the policy, call by call. Its current segment is a
context and then the policy's and the environment's tokens in turn; how an observation goes on
is the environment's choice:
- appended to the conversation (a multi-turn task): the segment grows and the next call
  continues it, one row for the whole episode (loss_mask 0 on the environment's tokens);
- the whole context of the next call (`env.segmented`): the segment closes and a new one
  starts, so no row is longer than one context and an episode can be of any length.
Closed segments wait in `closed` until the actor sends them on (`take_closed`), so an episode's
memory in the actor does not grow with its length. `_StepPool` runs environment steps on
daemon threads when they may be slow or hang.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from offpolicy.core.types import Trajectory


class Episode:
    def __init__(self, group_id: str, index: int, env, env_name: str, prompt_ids: np.ndarray,
                 messages=None):
        self.group_id, self.index, self.env, self.env_name = group_id, index, env, env_name
        self.id = f"{group_id}-{index}"
        segmented = bool(getattr(env, "segmented", False))
        self.segmented = segmented
        self.prompt_ids = prompt_ids
        self.history = None if messages is None else list(messages)  # a chat's messages so far
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.closed: list[Trajectory] = []  # segments closed and not yet sent on
        self.segment = 0                   # the current segment's index
        self.calls = 0
        self.reward = 0.0                  # the sum of the calls' rewards
        self.rewards: list[float] = []     # one per call, for a conversation (not a long episode)
        self.step_reward = self.proxy = 0.0  # the current segment's call: reward, proxy score
        self.info: dict = {}
        self.timings = {"generate": 0.0, "env": 0.0}
        self.finish: str | None = None
        self.length = 0                    # tokens after the first prompt, every segment's
        self.started = time.perf_counter()

    def rewarded(self, reward: float, info: dict | None = None) -> None:
        """The environment's reward for the latest call (and its proxy score, `info["proxy"]`,
        for `learner.credit: dense`)."""
        self.calls += 1
        self.reward += reward
        self.step_reward += reward
        self.proxy = float((info or {}).get("proxy", 0.0))
        if not self.segmented:
            self.rewards.append(reward)

    def add(self, ids, logprobs, versions, policy: bool) -> None:
        n = len(ids)
        self.parts.append((np.asarray(ids, np.int32),
                           np.full(n, int(policy), np.int8),
                           np.asarray(logprobs, np.float32) if policy else np.zeros(n, np.float32),
                           np.asarray(versions, np.int32) if policy else np.full(n, -1, np.int32)))
        self.length += n

    def context(self) -> list[int]:
        """The current segment's context and every token since: what the next call sees."""
        return np.concatenate([self.prompt_ids] + [p[0] for p in self.parts]).tolist()

    def context_length(self) -> int:
        return len(self.prompt_ids) + sum(len(p[0]) for p in self.parts)

    def new_segment(self, prompt_ids: np.ndarray, messages=None) -> None:
        """Close the current segment and start the next from `prompt_ids` (the environment's
        new context); the context's tokens count towards the episode's length."""
        self.closed.append(self._row())
        self.segment += 1
        self.step_reward = self.proxy = 0.0
        self.prompt_ids, self.parts = prompt_ids, []
        self.history = None if messages is None else list(messages)
        self.length += len(prompt_ids)

    def take_closed(self) -> list[Trajectory]:
        rows, self.closed = self.closed, []
        return rows

    def _row(self) -> Trajectory:
        ids, mask, lp, versions = (np.concatenate(x) for x in zip(*self.parts)) if self.parts \
            else (np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.float32),
                  np.zeros(0, np.int32))
        row_id = f"{self.id}/{self.segment}" if self.segmented else self.id
        return Trajectory(id=row_id, group_id=self.group_id, prompt_ids=self.prompt_ids,
                          completion_ids=ids, loss_mask=mask, behavior_logprobs=lp,
                          versions=versions, reward=0.0, env=self.env_name, finish_reason="",
                          timings={"generate": 0.0, "env": 0.0},
                          episode_id=self.id if self.segmented else "", segment=self.segment,
                          step_reward=self.step_reward, proxy=self.proxy)

    def final_rows(self) -> list[Trajectory]:
        """The rows not sent on yet (closed segments and the last one), carrying the episode's
        reward, finish reason and segment count; the last also its timings and info."""
        reward = float(self.reward)
        rows = self.closed + [self._row()]
        self.closed = []
        for t in rows:
            t.reward, t.finish_reason, t.segments = reward, self.finish, self.segment + 1
        last = rows[-1]
        last.timings = {**self.timings, "wall": time.perf_counter() - self.started}
        if self.segmented:
            last.info = {**self.info, "calls": self.calls}
        else:
            last.info = ({**self.info, "turns": self.calls, "turn_rewards": self.rewards}
                         if self.calls > 1 else self.info)
        return rows

    # -- resume ---------------------------------------------------------------------------------

    def state(self) -> dict:
        """What a checkpoint keeps of this episode: everything but its environment, whose own
        `snapshot` goes in `env_state` (None for an environment without one: the episode
        cannot go on, and restarts with its group)."""
        out = {k: v for k, v in vars(self).items() if k not in ("env", "started")}
        snap = getattr(self.env, "snapshot", None)
        out["env_state"] = snap() if snap is not None and self.finish is None else None
        out["age_s"] = time.perf_counter() - self.started
        return out

    @staticmethod
    def can_resume(state: dict) -> bool:
        return state["finish"] is not None or state["env_state"] is not None

    @classmethod
    def resumed(cls, state: dict, env) -> "Episode":
        """The episode of `state`, its environment (`env`, fresh) restored to where it was."""
        ep = cls.__new__(cls)
        vars(ep).update({k: v for k, v in state.items() if k not in ("env_state", "age_s")})
        ep.env, ep.started = env, time.perf_counter() - state["age_s"]
        if ep.finish is None:
            env.restore(state["env_state"])
        return ep

    def close(self) -> None:
        """Let the environment end what it runs for this episode (a function's thread)."""
        close = getattr(self.env, "close", None)
        if close is not None:
            close()


@dataclass
class EpisodeGroup:
    """The episodes of one task (a GRPO group), in flight together."""

    id: str
    seed: int
    episodes: list[Episode] = field(default_factory=list)
    version: int | None = None  # lag mode: the work order's version
    failed: bool = False        # its environments did not start
    level: int | None = None    # `env.curriculum`: the knob's value its tasks started at

    @property
    def done(self) -> bool:
        return self.failed or all(ep.finish is not None for ep in self.episodes)


def start_step(env, text: str, delay: float, pool: "StepPool | None") -> Future:
    """A Future of `timed_step`: on the pool's threads, or run inline (already done)."""
    if pool is not None:
        return pool.submit(partial(timed_step, env, text, delay))
    fut: Future = Future()
    try:
        fut.set_result(timed_step(env, text, delay))
    except Exception as e:
        fut.set_exception(e)
    return fut


def timed_step(env, text: str, delay: float):
    """One environment step after `delay` seconds of simulated latency (on a pool thread)."""
    t0 = time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    obs, reward, done, info = env.step(text)
    return obs, reward, done, info, time.perf_counter() - t0


class StepPool:
    """Daemon threads that run environment steps, reused across turns and batches.

    Starting a thread per step cost about 0.4 ms of CPU each (a third of a 128-episode batch's
    CPU with 4 turns). Daemon threads cannot block the process from exiting, and a hung step
    only keeps its own thread: a new one is started whenever no idle thread is left for a job.
    """

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = self.queued = 0

    def submit(self, fn) -> Future:
        fut: Future = Future()
        with self.lock:
            self.queued += 1
            if self.queued > self.idle:  # every queued job has an idle thread to take it
                self.idle += 1
                threading.Thread(target=self._work, daemon=True, name="env-step").start()
        self.jobs.put((fn, fut))
        return fut

    def _work(self) -> None:
        while True:
            fn, fut = self.jobs.get()
            with self.lock:
                self.queued -= 1
                self.idle -= 1
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e
            with self.lock:  # idle again before the caller hears, so its next step reuses us
                self.idle += 1
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)
