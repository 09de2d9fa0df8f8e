"""The rollout actor: generates GRPO groups with whatever weights it holds, forever.

Reads: published weights (WeightSync), admission decisions from the buffer, requests from the
desk (evals for actor 0, snapshots for a checkpoint).
Writes: groups of Trajectories to the buffer, every token tagged with its policy version;
segments of long episodes as they close; eval results and snapshots to the desk.

`rollout.mode: continuous` (the default), one `advance` at a time: keep
`rollout.concurrent_episodes` episodes in flight; admit new groups into free slots (admission
may refuse: the staleness bound); load newer weights (a safe point: no generation in flight);
one engine call for every episode waiting for the policy; step the environments; send every
finished group to the buffer at once, and the closed segments of long episodes every second or
megabyte. So an episode is never held up by a slower one, and a long episode spans as many
weight versions as it lasts. In lag mode a work order's groups drain before the next order's
version is loaded (a trajectory must come from one version). `rollout.mode: batch` plays one
batch of groups to its slowest episode before the next (for comparisons; batch.py, with evals).
Episodes and their groups are in episodes.py, environment failures in failures.py. With
`engine.inflight_updates` (vLLM) the engine also polls for new weights between its steps.
A plain class: `offpolicy/runtime/ray_roles.py` wraps it as a Ray actor; tests drive it directly.
"""

from __future__ import annotations

import pickle
import random
import time
import uuid
from concurrent.futures import TimeoutError
from functools import partial
from pathlib import Path

import numpy as np

from offpolicy.actors.engine import SamplingParams, make_engine
from offpolicy.actors.batch import BatchLoop, BatchResult
from offpolicy.actors.episodes import Episode, EpisodeGroup, StepPool, start_step
from offpolicy.actors.failures import FailureLog
from offpolicy.config.schema import Config
from offpolicy.core.machine import peak_rss_mb
from offpolicy.core.types import Groups, Incarnation, Segments, Trajectory
from offpolicy.envs import env_kwargs, import_env_module, latency_sampler, make_env
from offpolicy.envs.curriculum import Curriculum
from offpolicy.models.chat import between_turns, messages_of, prompt_ids
from offpolicy.models.loading import context_limit, load_tokenizer

FLUSH_BYTES, FLUSH_S = 1 << 20, 1.0
"""Closed segments go to the buffer once a megabyte of them waits, or a second has passed."""


class RolloutActor(BatchLoop):
    def __init__(self, cfg: Config, actor_id: int, model_path: str, buffer, weights,
                 stream: int = 0, desk=None):
        self.cfg, self.actor_id = cfg, actor_id
        # This process's name in the buffer's ledger: a restarted actor is a new incarnation,
        # and the groups the old one was generating are counted as lost.
        self.incarnation = Incarnation.new(actor_id)
        # the desk (Ray layout): evals the driver asks of actor 0, snapshots for checkpoints
        self.buffer, self.weights, self.desk = buffer, weights, desk
        import_env_module(cfg.env.module)  # user code: tasks, and maybe an engine
        self.engine = make_engine(cfg, model_path, cfg.run.seed * 1000 + actor_id)
        self.tokenizer = load_tokenizer(model_path)
        self.sampling = SamplingParams(cfg.engine.temperature, cfg.engine.top_p,
                                       cfg.engine.max_new_tokens, stop=tuple(cfg.engine.stop))
        # Prompt draws; a resumed run (stream = its first step) draws afresh, not the first's
        self.rng = np.random.default_rng([cfg.run.seed, actor_id, stream] if stream
                                         else [cfg.run.seed, actor_id])
        self.make_env = partial(make_env, cfg.env.name, "train", eval_size=cfg.env.eval_size,
                                **env_kwargs(cfg.env, "train"))
        self.make_eval_env = partial(make_env, cfg.env.name, "eval", eval_size=cfg.env.eval_size,
                                     **env_kwargs(cfg.env, "eval"))
        self.curriculum = Curriculum.of(cfg.env)  # None, or moves the training tasks' length
        self.counts = {"batches": 0, "trajectories": 0, "episodes": 0, "env_errors": 0,
                       "env_timeouts": 0, "episodes_capped": 0, "context_cuts": 0,
                       "episodes_resumed": 0, "episodes_restarted": 0, "weight_loads": 0,
                       "inflight_loads": 0, "engine_calls": 0, "calls": 0, "segments_sent": 0,
                       "occupancy": 0.0}
        self.slots = (cfg.rollout.concurrent_episodes
                      or cfg.rollout.prompts_per_batch * cfg.rollout.group_size)
        self.groups: dict[str, EpisodeGroup] = {}     # in flight (continuous mode)
        self.outbox: list[Trajectory] = []      # closed segments not yet sent
        self._next_poll = self._next_desk = self._last_flush = self._next_close_check = 0.0
        self.max_context = context_limit(cfg, model_path)
        self.failures = FailureLog(actor_id, cfg.run.dir)
        # With simulated latency or a timeout, the environment steps of one call run at once on
        # daemon threads (tool calls wait on I/O, not the CPU; a hung step cannot block exit).
        # Without either they run inline, as cheap reward functions should.
        self.pool = StepPool() if cfg.env.latency or cfg.env.timeout_s else None
        self.latency = latency_sampler(cfg.env.latency)
        self.latency_rng = random.Random(cfg.run.seed * 1000 + actor_id)

    @property
    def live(self) -> list[Episode]:
        """The episodes in flight that wait for the policy."""
        return [ep for g in self.groups.values() for ep in g.episodes if ep.finish is None]

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, max_steps: int | None = None) -> dict:
        """Generate until the buffer closes (or `max_steps` turns); returns this actor's
        counts. The episodes still in flight then are abandoned (the ledger: unfinished)."""
        n = 0
        while (max_steps is None or n < max_steps) and self.turn() is not BatchResult.STOP:
            n += 1
        for ep in self.live:
            ep.close()
        return self.counts

    def turn(self, timeout: float = 1.0) -> BatchResult:
        """One engine call of the continuous loop (`advance`), or one batch (`one_batch`)."""
        if self.cfg.rollout.mode == "batch":
            return self.one_batch(timeout)
        return self.advance(timeout)

    def advance(self, timeout: float = 1.0) -> BatchResult:
        """One turn of the continuous loop: admission into free slots (waiting up to `timeout`
        only when nothing is in flight), the desk's requests, newer weights, one engine call
        for every episode waiting for the policy, and every finished group to the buffer."""
        if not self._admit(timeout):
            return BatchResult.STOP
        live = self.live
        if not live:
            return BatchResult.REFUSED
        between = self._inflight_sync if self.cfg.engine.inflight_updates else None
        self._call(live, self.sampling, between)
        added = self._collect()
        self._flush()
        return BatchResult.ADDED if added else BatchResult.ADVANCED

    def _admit(self, timeout: float) -> bool:
        """Start new groups in the free slots if the buffer admits them; serve the desk; load
        newer weights (lag mode: the work order's). False once the run is over."""
        busy = bool(self.groups)
        lag_busy = busy and any(g.version is not None for g in self.groups.values())
        n = (self.slots - len(self.live)) // self.cfg.rollout.group_size
        if n <= 0 or lag_busy:  # no room, or a lag-mode order still draining
            if self._run_over():
                return False
            self._serve_desk()
            if lag_busy:  # the order's version, whatever an eval loaded meanwhile
                self._load(next(g.version for g in self.groups.values()), 0)
            else:
                self._poll_weights()
            return True
        admission = self.buffer.admit(self.engine.version, n, 0.0 if busy else timeout,
                                      actor=self.incarnation)
        if admission.stop:
            return False
        self._serve_desk(force=True)
        self._load(admission.version, admission.published)
        if admission.admitted:
            seeds = self.rng.integers(0, 2**31, size=admission.n_groups)
            for seed in seeds:
                self._start_group(int(seed), admission.version)
        return True

    def _run_over(self) -> bool:
        """Whether the buffer has closed, asked at most every 0.2 s while no slot is free
        (admission, which says so otherwise, is not asked then): a run's end must not wait for
        its longest episode in flight."""
        now = time.perf_counter()
        if now < self._next_close_check:
            return False
        self._next_close_check = now + 0.2
        return self.buffer.is_closed()

    def _load(self, order: int | None, published: int) -> None:
        if order is not None:  # lag mode: a work order for exactly this version
            if order != self.engine.version:
                self.sync_weights(want=order)
        elif published > self.engine.version:
            self.sync_weights()

    def _start_group(self, seed: int, version: int | None, register: bool = True) -> EpisodeGroup:
        """`group_size` episodes of the task `seed` picks, in flight from now on."""
        group = EpisodeGroup(f"{self.actor_id}-{uuid.uuid4().hex[:12]}", seed, version=version)
        if register:
            self.groups[group.id] = group
        make = self.make_env if self.curriculum is None else self.curriculum.start(group,
                                                                                  self.make_env)
        try:
            group.episodes = self._episodes(make, group.id, seed, self.cfg.rollout.group_size)
        except Exception as e:  # a task that cannot start costs its group, counted
            group.failed = True
            self.failures.record(group.id, 0, e, self.counts)
        return group

    def _episodes(self, make, group_id: str, seed: int, n: int) -> list[Episode]:
        """n fresh episodes of one task; its prompt is tokenized once."""
        envs = [make() for _ in range(n)]
        prompts = [env.reset(seed) for env in envs]
        messages = messages_of(prompts[0], self.cfg.env.system_prompt, self.cfg.env.chat)
        ids = np.asarray(prompt_ids(self.tokenizer, prompts[0], messages), np.int32)
        return [Episode(group_id, k, env, self.cfg.env.name, ids, messages)
                for k, env in enumerate(envs)]

    # -- one engine call --------------------------------------------------------------------------

    def _call(self, episodes: list[Episode], sampling: SamplingParams, between_steps) -> None:
        """One engine call for `episodes`, then each one's environment step (concurrently on
        the pool when steps may be slow or hang)."""
        waiting = [ep for ep in episodes if not self._too_long(ep)]
        if not waiting:
            return
        t0 = time.perf_counter()
        completions = self.engine.generate([ep.context() for ep in waiting], sampling,
                                           between_steps=between_steps)
        gen_s = (time.perf_counter() - t0) / len(completions)
        self.counts["engine_calls"] += 1
        self.counts["calls"] += len(waiting)
        self.counts["occupancy"] += len(waiting) / self.slots
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions],
                                            skip_special_tokens=True)
        delays = [self.latency(self.latency_rng) for _ in waiting]
        steps = [start_step(ep.env, text, d, self.pool)
                 for ep, text, d in zip(waiting, texts, delays)]
        start, timeout = time.perf_counter(), self.cfg.env.timeout_s or None
        for ep, c, text, step in zip(waiting, completions, texts, steps):
            ep.timings["generate"] += gen_s
            ep.add(c.token_ids, c.logprobs, c.versions, policy=True)
            left = None if timeout is None else max(0.0, start + timeout - time.perf_counter())
            try:
                result = step.result(timeout=left)
            except TimeoutError:
                self._end(ep, "timeout", "env_timeouts")
                continue
            except Exception as e:  # a bad environment or reward function: contained
                self.failures.record(ep.id, ep.calls + 1, e, self.counts)
                self._end(ep, "error", "env_errors")
                continue
            self._turn(ep, c, text, *result)

    def _too_long(self, ep: Episode) -> bool:
        """A context that, with `engine.max_new_tokens`, would not fit the model's: the episode
        ends there (finish reason `context`, counted), never a crash."""
        if not self.max_context or \
                ep.context_length() + self.sampling.max_new_tokens <= self.max_context:
            return False
        self._end(ep, "context", "context_cuts")
        return True

    def _end(self, ep: Episode, finish: str, count: str) -> None:
        ep.finish = finish
        self.counts[count] += 1
        ep.close()

    def _turn(self, ep: Episode, c, text: str, obs, reward, done, info, env_s: float) -> None:
        """Record the environment's answer to a call. If the episode goes on, its observation
        is the next call's context (a segmented environment: a new segment) or is appended to
        the conversation (in a chat, as a message rendered by the template)."""
        ep.timings["env"] += env_s
        ep.rewarded(float(reward), info)
        ep.info.update(info or {})
        if done or obs is None:
            ep.finish = c.finish_reason
        elif ep.calls >= self.cfg.env.max_turns:
            self._end(ep, "max_turns", "episodes_capped")
        elif ep.segmented:
            messages = messages_of(obs, self.cfg.env.system_prompt, self.cfg.env.chat)
            ep.new_segment(np.asarray(prompt_ids(self.tokenizer, obs, messages), np.int32),
                           messages)
        else:
            if ep.history is None:
                ids = self.tokenizer(obs, add_special_tokens=False)["input_ids"]
            else:
                eos = len(c.token_ids) > 0 and int(c.token_ids[-1]) == self.tokenizer.eos_token_id
                ids = between_turns(self.tokenizer, ep.history, obs, eos)
                ep.history += [{"role": "assistant", "content": text},
                               obs if isinstance(obs, dict) else {"role": "user", "content": obs}]
            ep.add(np.asarray(ids, np.int32), None, None, policy=False)
        if ep.finish is None and self.cfg.env.max_tokens and ep.length >= self.cfg.env.max_tokens:
            self._end(ep, "length", "episodes_capped")

    # -- finished groups and closed segments ------------------------------------------------------

    def _collect(self) -> int:
        """Send every finished group to the buffer in one call; returns how many went."""
        done = [g for g in self.groups.values() if g.done]
        if not done:
            return 0
        groups, dropped = [], []
        for g in done:
            del self.groups[g.id]
            rows, lost = self._group_rows(g)
            groups += [rows] if rows else []
            dropped += lost
        self._send(groups, len(done), done[0].version, dropped)
        return len(done)

    def _group_rows(self, group: EpisodeGroup) -> tuple[list[Trajectory], list[str]]:
        """(the rows a finished group trains on, the ids of its episodes dropped): an episode
        whose environment raised costs its group (`rollout.failure_cost: group`, or when fewer
        than two episodes would remain) or itself alone (`episode`)."""
        if group.failed:
            return [], []
        failed = [ep for ep in group.episodes if ep.finish == "error"]
        keep = [ep for ep in group.episodes if ep.finish != "error"]
        if failed and (self.cfg.rollout.failure_cost == "group" or len(keep) < 2):
            keep = []
        self.counts["episodes"] += len(keep)
        self.counts["trajectories"] += sum(ep.segment + 1 for ep in keep)  # streamed ones too
        if self.curriculum is not None and group.level is not None and keep:
            self.curriculum.record(group.level, [ep.reward for ep in keep], self.counts)
        rows = [t for ep in keep for t in ep.final_rows()]
        return rows, [ep.id for ep in group.episodes if ep not in keep and ep.segmented]

    def _send(self, groups: list[list[Trajectory]], reserved: int, version: int | None,
              dropped: list[str]) -> None:
        self._flush(force=True)  # the episodes' earlier segments first
        self.counts["batches"] += 1
        self.counts["peak_rss_mb"] = round(peak_rss_mb(), 1)
        self.buffer.add(Groups(groups), reserved, version,  # pickles packed
                        actor=self.incarnation, report=dict(self.counts), dropped=dropped)

    def _flush(self, force: bool = False) -> None:
        """Send the closed segments of episodes in flight to the buffer (which holds them until
        their episode ends): every `FLUSH_S` seconds or `FLUSH_BYTES`, or now with `force`."""
        for g in self.groups.values():
            for ep in g.episodes:
                if ep.closed and ep.finish is None:
                    self.outbox += ep.take_closed()
        if not self.outbox:
            return
        now = time.perf_counter()
        if force or now - self._last_flush >= FLUSH_S or \
                sum(t.nbytes for t in self.outbox) >= FLUSH_BYTES:
            self.counts["segments_sent"] += len(self.outbox)
            by_episode: dict[str, list[Trajectory]] = {}
            for t in self.outbox:
                by_episode.setdefault(t.episode_id, []).append(t)
            self.buffer.add_segments([Segments.of(rows) for rows in by_episode.values()],
                                     actor=self.incarnation)
            self.outbox, self._last_flush = [], now

    # -- weights and the desk ---------------------------------------------------------------------

    def sync_weights(self, want: int | None = None) -> bool:
        """Load the newest published weights if newer than the engine's (or exactly `want`)."""
        for _ in range(3):
            got = self.weights.fetch(self.engine.version, want)
            if got is None:
                return False
            try:
                self.engine.load_weights(*got)
            except Exception:
                if not self.weights.vanished(got[1]):
                    raise  # a real error
            # A sync that keeps few versions (FileSync) may have dropped this one, or reused
            # its folder for a newer one, during the read: then fetch again.
            if not self.weights.vanished(got[1]):
                self.counts["weight_loads"] += 1
                return True
        raise RuntimeError("weights: the published weights vanished 3 times in a row")

    def weight_rpc(self, method: str, *args) -> None:
        """NCCLSync's calls into a running engine (a second Ray thread of this actor; GPU
        only); the engine (`PushedWeights`) keeps its steps out while weights change."""
        self.engine.weight_rpc(method, *args)
        if method == "finish_weight_update":
            self.counts["weight_loads"] += 1

    def _inflight_sync(self) -> None:
        """Between engine steps: load newer weights if the learner published any."""
        if self._poll_weights(0.01):
            self.counts["inflight_loads"] += 1

    def _poll_weights(self, every_s: float = 0.05) -> bool:
        """Newer weights, if any were published: polls the weight store at most every
        `every_s` (one small call) so fast engine calls are not slowed."""
        now = time.perf_counter()
        if now < self._next_poll:
            return False
        self._next_poll = now + every_s
        return self.sync_weights()

    def _serve_desk(self, force: bool = False) -> None:
        """The driver's requests, at most every 0.2 s unless `force`: a checkpoint's hold (write
        this actor's snapshot, then wait for the release), and for actor 0 a requested eval with
        the newest weights or a model folder's (lag mode reloads its order's version after)."""
        now = time.perf_counter()
        if self.desk is None or (not force and now < self._next_desk):
            return
        self._next_desk = now + 0.2
        if (folder := self.desk.holding(self.incarnation)) is not None:
            self.snapshot_to(Path(folder) / f"actor{self.actor_id}.pkl")
            self.desk.held_by(self.actor_id)
            while self.desk.is_holding():
                time.sleep(0.05)
        if (request := self.desk.take(self.incarnation)) is not None:
            order = next((g.version for g in self.groups.values()), None)
            if folder := request["weights"]:  # the base model, after the last step
                self.engine.load_weights(0, folder)
            else:
                self.sync_weights()
            self.desk.report({**self.evaluate(), **({"eval/weights": folder} if folder else {})})
            if order is not None and order != self.engine.version:
                self.sync_weights(want=order)

    # -- resume -----------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The groups in flight, for a checkpoint, once every closed segment is in the buffer:
        each episode's state with its environment's `snapshot`. An episode whose environment
        has none restarts with its group on resume."""
        self._flush(force=True)
        settle = getattr(self.buffer, "settle", None)  # a Ray buffer: the last send arrived
        if settle is not None:
            settle()
        return {"groups": [{"id": g.id, "seed": g.seed, "version": g.version, "level": g.level,
                            "failed": g.failed, "episodes": [ep.state() for ep in g.episodes]}
                           for g in self.groups.values()],
                "curriculum": self.curriculum.state() if self.curriculum else None}

    def snapshot_to(self, path: Path) -> None:
        """`snapshot()` written to `path` (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(pickle.dumps(self.snapshot(), protocol=5))
        tmp.replace(path)

    def restore(self, path: str) -> None:
        """Go on with a checkpoint's episodes in flight (its `snapshot_to` file, if any): a
        group whose episodes can all resume goes on from their last segments; any other
        starts its task again, counted (`episodes_restarted`). The buffer then counts these
        groups as this incarnation's, with the segments it holds of the resumed episodes."""
        if not Path(path).is_file():
            return
        owed: dict[int | None, int] = {}
        resumed: list[str] = []
        saved = pickle.loads(Path(path).read_bytes())
        if self.curriculum is not None:
            self.curriculum.restore(saved.get("curriculum") or {})
        for g in saved["groups"]:
            group = self._resume_group(g)
            self.groups[group.id] = group
            owed[group.version] = owed.get(group.version, 0) + 1
            if group.id == g["id"]:
                resumed += [ep.id for ep in group.episodes if ep.segmented]
        self.buffer.adopt(owed, self.incarnation, resumed)

    def _resume_group(self, g: dict) -> EpisodeGroup:
        if g["failed"] or all(Episode.can_resume(s) for s in g["episodes"]):
            group = EpisodeGroup(g["id"], g["seed"], version=g["version"], failed=g["failed"],
                                 level=g.get("level"))
            group.episodes = [Episode.resumed(s, self.make_env() if s["finish"] is None
                                              else None) for s in g["episodes"]]
            self.counts["episodes_resumed"] += sum(s["finish"] is None for s in g["episodes"])
            return group
        self.counts["episodes_restarted"] += len(g["episodes"])
        return self._start_group(g["seed"], g["version"], register=False)
