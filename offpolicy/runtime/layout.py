"""The `Layout` protocol: where a run's roles live, as the driver sees them; and what both
layouts build their roles from.

Reads: nothing. Writes: nothing. `launch.train` drives a run through these members only. The
implementations: `SerialRoles` (serial_roles.py, `resources.serial`: every role in the driver's
process, taking turns) and `RayRoles` (ray_roles.py: every role its own Ray actor, the rollout
actors generating continuously).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from offpolicy.algorithms.credit import Credit
from offpolicy.algorithms.losses import group_advantage
from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.config.plan import RunPlan
from offpolicy.config.schema import Config


def buffer_arguments(cfg: Config, plan: RunPlan) -> dict:
    """The replay buffer's constructor arguments: the config's, and for batches sized in rows
    the advantage the buffer computes as each group arrives."""
    args = ReplayBuffer.arguments(cfg, plan)
    if cfg.learner.batch_rows:
        lc = cfg.learner
        args["advantage"] = group_advantage(cfg.loss.name, cfg.loss.params, lc.advantage,
                                            Credit(lc.credit, lc.credit_weight, lc.credit_gamma))
    return args


class Layout(Protocol):
    def startup(self) -> dict:
        """Start-up marks as Unix times: `learner` and `actors` built (and `ray` started)."""

    def start(self) -> None:
        """Let the rollout actors generate (after any resumed state is loaded)."""

    def step(self) -> dict:
        """One learner update; returns its metrics."""

    def evaluate(self) -> dict:
        """The held-out eval of the newest weights (published first if needed), waited for:
        `eval/reward`, `eval/version`, `eval/seconds`."""

    def evaluate_weights(self, weights: str) -> dict:
        """The held-out eval of the model folder `weights` (the base model, for `eval.base:
        end`), waited for; actor 0 reloads the newest published weights afterwards."""

    def request_eval(self) -> None:
        """Ask for an eval of the newest weights without waiting; see `eval_results`."""

    def eval_results(self) -> list[dict]:
        """Evals finished since the last call, oldest first."""

    def save_state(self, folder: Path, with_buffer: bool) -> None:
        """A resumable checkpoint's roles' part: the learner's, and the buffer's snapshot."""

    def load_state(self, folder: Path) -> int:
        """Continue from `save_state`'s folder; returns the learner version."""

    def finish(self, checkpoint: Path) -> tuple[dict, list[dict], dict]:
        """Save the final policy, stop the actors; (buffer stats, each actor's counts, the
        ledger)."""

    def close(self) -> None:
        """Stop every process the layout started."""
