"""The run plan: what a config decides for a run, resolved once at start and handed to the roles.

Reads: a `Config`. Writes: nothing. `RunPlan.of(cfg)` is the one place a config's staleness
mode, `engine.weight_sync: auto`, `checkpoint.every`, the weight versions kept and the thread
counts are worked out; the layouts, the roles and the pre-flight checks read the plan's fields
(validation, `runtime/validate.py`, checks the config itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from offpolicy.config.schema import Config


@dataclass(frozen=True)
class RunPlan:
    lag: int | None
    """Lag mode's k (`staleness.mode: lag`): update t trains on data of version t - k. None in
    bound mode."""
    max_staleness: int
    """The largest staleness the run can produce: k in lag mode, `buffer.max_staleness` in
    bound mode."""
    sync_every: int
    """Versions between two publishes (`learner.sync_every`)."""
    store_versions: int
    """Published weight versions the weight store keeps: the newest alone in bound mode (actors
    always load the newest); k + 2 in lag mode (actors load the exact version asked of them)."""
    file_versions: int
    """Versions the filesystem sync keeps on disk (at least 3: an actor may still be reading
    an older folder while the next one is written)."""
    parity_window: int
    """How many versions back the learner keeps published weights for the engine/learner
    log-prob check (`engine.logprob_check_every`): the oldest token of a batch is at most
    max_staleness + sync_every versions old. 0 = no check, nothing kept."""
    checkpoint_every: int
    """Steps between resumable checkpoints; 0 = none (lag mode writes none: an unfinished
    ablation cell is rerun instead)."""
    weight_sync: str
    """How weights reach the actors, `auto` resolved: `filesystem` for vLLM (it reloads from
    files), `object_store` for the other engines, or the configured kind."""
    stale_tokens: str
    """Policy tokens older than `max_staleness` when trained (the early segments of a long
    episode): `train` them with the loss's correction, or `mask` them (`buffer.stale_tokens`)."""
    learner_threads: int
    """torch threads of a learner process (`resources.learner_threads`, else `torch_threads`);
    in the serial layout, of the one process every role shares."""
    actor_threads: int
    """torch threads of a rollout actor's process (`resources.torch_threads`)."""
    engine_dtype: str
    """The engine's dtype, `engine.dtype: auto` resolved to `learner.precision`'s: `float32`
    for fp32, `bfloat16` for bf16 (the hf engine generates under bf16 autocast then)."""

    @classmethod
    def of(cls, cfg: Config) -> "RunPlan":
        lag = cfg.staleness.k if cfg.staleness.mode == "lag" else None
        bound = lag if lag is not None else cfg.buffer.max_staleness
        store = 1 if lag is None else lag + 2
        sync, res = cfg.engine.weight_sync, cfg.resources
        if sync == "auto":
            sync = "filesystem" if cfg.engine.name == "vllm" else "object_store"
        return cls(lag=lag, max_staleness=bound, sync_every=cfg.learner.sync_every,
                   store_versions=store, file_versions=max(3, store),
                   parity_window=(bound + cfg.learner.sync_every
                                  if cfg.engine.logprob_check_every else 0),
                   checkpoint_every=cfg.checkpoint.every if lag is None else 0,
                   weight_sync=sync, stale_tokens=cfg.buffer.stale_tokens,
                   learner_threads=res.learner_threads or res.torch_threads,
                   actor_threads=res.torch_threads,
                   engine_dtype=(cfg.engine.dtype if cfg.engine.dtype != "auto" else
                                 {"fp32": "float32", "bf16": "bfloat16"}[cfg.learner.precision]))

    @property
    def parity_copies(self) -> int:
        """Full weight copies the log-prob check holds at most: its shadow model and one per
        published version inside the window (0 without the check)."""
        if not self.parity_window:
            return 0
        return 2 + self.parity_window // self.sync_every
