"""Environment failures of the rollout actors, so that none passes unseen.

Reads: the exceptions an environment, reward function or episode function raised. Writes: the
first one's traceback to stderr, then the count and rate every 30 s; the first 100 tracebacks
to the run folder's `env_errors.log`.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path


class FailureLog:
    """Environment failures, so that none passes unseen: the first one's traceback on stderr,
    then the count and rate every 30 s; the tracebacks (the first 100) in the run folder's
    `env_errors.log` when the folder is on this node."""

    KEEP = 100

    def __init__(self, actor_id: int, run_dir: str):
        self.actor_id, self.n, self.last_said = actor_id, 0, 0.0
        self.path = Path(run_dir) / "env_errors.log" if run_dir and Path(run_dir).is_dir() \
            else None

    def record(self, episode: str, call: int, error: BaseException, counts: dict) -> None:
        self.n += 1
        text = "".join(traceback.format_exception(error)).rstrip()
        if self.path is not None and self.n <= self.KEEP:
            with open(self.path, "a") as f:
                f.write(f"actor {self.actor_id}, episode {episode}, call {call}:\n{text}\n\n")
        now = time.monotonic()
        if self.n == 1:
            where = f"; tracebacks in {self.path}" if self.path else ""
            print(f"rollout actor {self.actor_id}: an environment step raised (episode "
                  f"{episode}, call {call}); its episode is dropped and counted as env_errors"
                  f"{where}:\n{text}", file=sys.stderr, flush=True)
            self.last_said = now
        elif now - self.last_said >= 30:
            started = max(counts.get("episodes", 0) + self.n, 1)
            print(f"rollout actor {self.actor_id}: {self.n} environment failures so far "
                  f"(about {self.n / started:.0%} of its episodes)", file=sys.stderr, flush=True)
            self.last_said = now
