"""The serial layout (`resources.serial`): every role in this one process, taking turns.

Reads: a validated Config and its run plan. Writes: what the roles write (see `launch.py`).
The same role classes as the Ray layout (`ray_roles.py`), without Ray: the buffer is a plain
object, weights go through a `LocalSync`, evals run in place. The staleness ablation's layout.
A `Layout` (layout.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from offpolicy.actors.rollout import BatchResult, RolloutActor
from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.config.plan import RunPlan
from offpolicy.config.schema import Config
from offpolicy.learner.learner import Learner
from offpolicy.runtime.layout import buffer_arguments
from offpolicy.weights.sync import LocalSync


class SerialRoles:
    """`resources.serial`: the same role classes in this process, taking turns. Before each
    update the actors (round robin, one engine call or batch each) generate until the buffer
    holds that update's batch."""

    def __init__(self, cfg: Config, plan: RunPlan, model_path: str, stream: int = 0):
        self.buffer = ReplayBuffer(**buffer_arguments(cfg, plan))
        sync = LocalSync(keep=plan.store_versions)
        self.actors = [RolloutActor(cfg, i, model_path, self.buffer, sync, stream)
                       for i in range(cfg.rollout.num_actors)]
        ready = time.time()
        self.learner = Learner(cfg, model_path, self.buffer, sync, plan=plan)
        self._startup = {"actors": ready, "learner": time.time()}  # start-up marks (Unix times)
        self.turn = 0
        self.done_evals: list[dict] = []

    def startup(self) -> dict:
        return self._startup

    def start(self) -> None:
        """Nothing runs between steps here: actors generate inside `step`."""

    def step(self) -> dict:
        refused = 0
        while not self.buffer.ready(self.learner.version):
            actor = self.actors[self.turn % len(self.actors)]
            self.turn += 1
            result = actor.turn(timeout=0)
            refused = refused + 1 if result is BatchResult.REFUSED else 0
            if refused >= len(self.actors):  # nobody may generate and no batch is ready
                raise RuntimeError("serial layout: the buffer admits no work and holds no batch "
                                   f"for update {self.learner.version}")
        return self.learner.step()

    def evaluate(self) -> dict:
        """The held-out eval on actor 0's engine with the learner's newest weights (published
        first if they were not yet): `eval/reward`, `eval/version`, `eval/seconds`."""
        self.learner.publish_latest()
        actor = self.actors[0]
        actor.sync_weights()
        return actor.evaluate()

    def evaluate_weights(self, weights: str) -> dict:
        """The held-out eval of the model folder `weights` (the base model, `eval.base: end`)
        on actor 0's engine, which reloads the newest published weights at its next turn."""
        self.actors[0].engine.load_weights(0, weights)
        return self.actors[0].evaluate()

    def request_eval(self) -> None:
        """Here an eval simply runs now; `eval_results` hands it over."""
        self.done_evals.append(self.evaluate())

    def eval_results(self) -> list[dict]:
        done, self.done_evals = self.done_evals, []
        return done

    def save_state(self, folder: Path, with_buffer: bool) -> None:
        """The learner's part, and with the buffer the actors' episodes in flight too."""
        self.learner.save_state(str(folder))
        if with_buffer:
            for i, actor in enumerate(self.actors):
                actor.snapshot_to(folder / "actors" / f"actor{i}.pkl")
            self.buffer.save(folder / "buffer.pkl")

    def load_state(self, folder: Path) -> int:
        if (folder / "buffer.pkl").is_file():
            self.buffer.load(folder / "buffer.pkl")
        version = self.learner.load_state(str(folder))
        for i, actor in enumerate(self.actors):
            actor.restore(str(folder / "actors" / f"actor{i}.pkl"))
        self.buffer.settle_restore()
        return version

    def finish(self, checkpoint: Path) -> tuple[dict, list[dict], dict]:
        self.learner.save(str(checkpoint))
        self.buffer.close()
        return (self.buffer.stats(), [dict(a.counts) for a in self.actors],
                self.buffer.ledger(final=True))

    def close(self) -> None:
        """Nothing runs outside this process."""
