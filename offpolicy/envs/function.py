"""Episodes written as plain Python functions: any agent scaffold, one reward at the end.

Reads/writes nothing. An episode function takes a `policy` and a task seed, calls
`policy(prompt)` any number of times (a string, or a list of chat messages) and gets the
policy's text back each time, and returns the episode's reward (or `(reward, info)`):

    def count_down(policy, seed, split="train"):
        n = random.Random(seed).randint(3, 9)
        for _ in range(n):
            n = int(policy(f"{n}-1=") or 0)       # one policy call: one segment
        return float(n == 0)

    register_episode("count_down", count_down)

Every `policy` call is one segment: its prompt is that segment's whole context, so an episode
can be far longer than the model's context and the function decides what the model sees (a
window, a carried state, a summary). The rollout actor batches the calls of all its episodes in
flight into its engine calls: `FunctionEnv` runs each episode on a thread of its own, which
waits inside `policy` until the actor has generated its answer. An episode that raises is
contained and counted (`env_errors`); one that hangs is cut by `env.timeout_s`. A function
cannot be snapshotted, so a resumed run restarts its episodes in flight (counted).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from offpolicy.envs import register_env

EpisodeFn = Callable[..., Any]


class EpisodeCancelled(BaseException):
    """Raised inside an episode function's `policy` call when the actor ends the episode
    early (a cap, a timeout, the end of the run); a BaseException, so the function's own
    `except Exception` does not catch it."""


class _Done:
    def __init__(self, result=None, error: BaseException | None = None):
        self.result, self.error = result, error


class FunctionEnv:
    """The Env protocol over an episode function: `reset` starts the function and returns its
    first prompt, `step(text)` answers the pending call and returns the next prompt, or the
    reward when the function returns."""

    segmented = True

    def __init__(self, fn: EpisodeFn, split: str = "train", eval_size: int = 200, **kwargs):
        self.fn, self.split, self.kwargs = fn, split, kwargs
        self._asks: queue.Queue = queue.Queue()     # the function's prompts, then _Done
        self._answers: queue.Queue | None = None    # the policy's texts, or None: cancelled
        self._thread: threading.Thread | None = None

    def reset(self, seed: int):
        self.close()
        self._asks, self._answers = queue.Queue(), queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(seed, self._answers),
                                        daemon=True, name="episode-fn")
        self._thread.start()
        prompt = self._next()
        if prompt is None:
            raise ValueError("an episode function must call policy(...) at least once")
        return prompt[0]

    def step(self, text: str):
        self._answers.put(text)
        got = self._next()
        if got is not None:
            return got[0], 0.0, False, {}
        reward, info = self._result
        return None, reward, True, info

    def close(self) -> None:
        """End the episode's thread if it still waits for the policy (the episode was cut)."""
        if self._thread is not None and self._thread.is_alive() and self._answers is not None:
            self._answers.put(None)
        self._thread = None

    def _run(self, seed: int, answers: queue.Queue) -> None:
        def policy(prompt):
            self._asks.put((prompt,))
            text = answers.get()
            if text is None:
                raise EpisodeCancelled()
            return text
        try:
            out = self.fn(policy, seed, split=self.split, **self.kwargs)
        except EpisodeCancelled:
            return
        except BaseException as e:  # handed to the actor's thread, which contains it
            self._asks.put(_Done(error=e))
            return
        self._asks.put(_Done(result=out))

    def _next(self) -> tuple | None:
        """The function's next prompt as a 1-tuple, or None when it returned (`_result` then
        holds (reward, info)); re-raises what the function raised."""
        got = self._asks.get()
        if not isinstance(got, _Done):
            return got
        if got.error is not None:
            raise got.error
        reward, info = got.result if isinstance(got.result, tuple) else (got.result, {})
        self._result = (float(reward), dict(info or {}))
        return None


def register_episode(name: str, fn: EpisodeFn) -> None:
    """Make the episode function `fn(policy, seed, split=..., **env.kwargs) -> reward` (or
    `(reward, info)`) available as `env.name: <name>`."""
    register_env(name, lambda split="train", eval_size=200, **kwargs: FunctionEnv(
        fn, split=split, eval_size=eval_size, **kwargs))
