"""The rollout actor: generates GRPO groups with whatever weights it holds, forever.

Reads: published weights (WeightSync), admission decisions from the buffer, eval requests from
the eval desk (actor 0).
Writes: groups of Trajectories to the buffer, every token tagged with its policy version;
eval results to the desk.

Loop (one iteration = one batch of `prompts_per_batch` prompts x `group_size` samples):
  admit (may block: the staleness bound) -> [actor 0: the eval the desk holds, if any] -> load
  newest weights (safe point: no generation in flight) -> generate -> score in the environment
  -> add to the buffer.
With `engine.inflight_updates` (vLLM) the engine also polls for new weights between its steps,
so one trajectory's tokens can carry several versions.
A plain class: `offpolicy/runtime/ray_roles.py` wraps it as a Ray actor; tests drive it directly.
"""

from __future__ import annotations

import enum
import queue
import random
import threading
import time
import uuid
from concurrent.futures import Future, TimeoutError
from functools import partial

import numpy as np

from offpolicy.actors.engine import SamplingParams, make_engine
from offpolicy.config.schema import Config
from offpolicy.core.machine import peak_rss_mb
from offpolicy.core.types import Groups, Incarnation, Trajectory
from offpolicy.envs import import_env_module, latency_sampler, make_env
from offpolicy.models.chat import between_turns, messages_of, prompt_ids
from offpolicy.models.loading import load_tokenizer


class BatchResult(enum.Enum):
    """What one `RolloutActor.one_batch` did."""

    ADDED = "added"
    """A batch was generated and added to the buffer."""
    REFUSED = "refused"
    """The buffer did not admit a batch in time (the staleness bound held the actor off)."""
    STOP = "stop"
    """The run is over."""


class RolloutActor:
    def __init__(self, cfg: Config, actor_id: int, model_path: str, buffer, weights,
                 stream: int = 0, desk=None):
        self.cfg, self.actor_id = cfg, actor_id
        # This process's name in the buffer's ledger: a restarted actor is a new incarnation,
        # and the batch the old one was generating is counted as lost.
        self.incarnation = Incarnation.new(actor_id)
        # the eval desk (actor 0 of a Ray layout): evals the driver asked for, run here
        self.buffer, self.weights, self.desk = buffer, weights, desk
        import_env_module(cfg.env.module)  # user code: tasks, and maybe an engine
        self.engine = make_engine(cfg, model_path, cfg.run.seed * 1000 + actor_id)
        self.tokenizer = load_tokenizer(model_path)
        self.sampling = SamplingParams(cfg.engine.temperature, cfg.engine.top_p,
                                       cfg.engine.max_new_tokens, stop=tuple(cfg.engine.stop))
        # Prompt draws; a resumed run (stream = its first step) draws prompts afresh instead
        # of replaying the interrupted run's from the start.
        self.rng = np.random.default_rng([cfg.run.seed, actor_id, stream] if stream
                                         else [cfg.run.seed, actor_id])
        self.make_env = partial(make_env, cfg.env.name, "train", eval_size=cfg.env.eval_size,
                                **cfg.env.kwargs)
        self.make_eval_env = partial(make_env, cfg.env.name, "eval", eval_size=cfg.env.eval_size,
                                     **cfg.env.kwargs)
        self.counts = {"batches": 0, "trajectories": 0, "env_errors": 0, "env_timeouts": 0,
                       "weight_loads": 0, "inflight_loads": 0}
        self._next_poll = 0.0
        # With simulated latency or a timeout, the environment steps of one turn run at once on
        # daemon threads (tool calls wait on I/O, not the CPU; a hung step cannot block exit).
        # Without either they run inline, as cheap reward functions should.
        self.pool = _StepPool() if cfg.env.latency or cfg.env.timeout_s else None
        self.latency = latency_sampler(cfg.env.latency)
        self.latency_rng = random.Random(cfg.run.seed * 1000 + actor_id)

    def run(self, max_batches: int | None = None) -> dict:
        """Generate until the buffer closes (or `max_batches`); returns this actor's counts."""
        while max_batches is None or self.counts["batches"] < max_batches:
            if self.one_batch() is BatchResult.STOP:
                break
        return self.counts

    def one_batch(self, timeout: float = 1.0) -> BatchResult:
        """Ask the buffer for admission (waiting up to `timeout`), run the eval the desk holds
        for this actor if any, load weights, generate one batch and add it."""
        n = self.cfg.rollout.prompts_per_batch
        admission = self.buffer.admit(self.engine.version, n, timeout, actor=self.incarnation)
        if admission.stop:
            return BatchResult.STOP
        if self.desk is not None and self.desk.take(self.incarnation):
            self.sync_weights()  # the driver asked for an eval: newest weights, then this batch
            self.desk.report(self.evaluate())
        if admission.version is not None:  # lag mode: a work order for exactly this version
            if admission.version != self.engine.version:
                self.sync_weights(want=admission.version)
        elif admission.published > self.engine.version:
            self.sync_weights()
        if not admission.admitted:
            return BatchResult.REFUSED
        groups = self.rollout_batch(admission.n_groups)
        self.counts["batches"] += 1
        self.counts["peak_rss_mb"] = round(peak_rss_mb(), 1)
        self.buffer.add(Groups(groups), admission.n_groups, self.engine.version,  # pickles packed
                        actor=self.incarnation, report=dict(self.counts))
        return BatchResult.ADDED

    def sync_weights(self, want: int | None = None) -> bool:
        """Load the newest published weights if newer than the engine's (or exactly `want`)."""
        for _ in range(3):
            got = self.weights.fetch(self.engine.version, want)
            if got is None:
                return False
            try:
                self.engine.load_weights(*got)
            except Exception:
                # A sync that keeps few versions (FileSync) may have dropped this one since
                # the fetch: fetch again; anything else is a real error.
                if self.weights.vanished(got[1]):
                    continue
                raise
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
        """Between engine steps: load newer weights if the learner published any. Polls the
        weight store at most every 10 ms (one small Ray call) so fast steps are not slowed."""
        now = time.perf_counter()
        if now >= self._next_poll:
            self._next_poll = now + 0.01
            if self.sync_weights():
                self.counts["inflight_loads"] += 1

    def rollout_batch(self, n_prompts: int | None = None) -> list[list[Trajectory]]:
        """n_prompts (default prompts_per_batch) x group_size episodes; returns whole groups."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        seeds = self.rng.integers(0, 2**31, size=n_prompts or cfg.rollout.prompts_per_batch)
        episodes = self._play(self.make_env, seeds, G, self.sampling,
                              self._inflight_sync if cfg.engine.inflight_updates else None)
        return self._groups(episodes, G)

    def evaluate(self) -> dict:
        """Greedy reward on the fixed held-out eval set with the weights loaded now, played as
        training episodes are (multi-turn included), on this actor's engine."""
        t0 = time.perf_counter()
        greedy = SamplingParams(max_new_tokens=self.cfg.engine.max_new_tokens, greedy=True,
                                stop=tuple(self.cfg.engine.stop))
        episodes = self._play(self.make_eval_env, range(self.cfg.env.eval_size), 1, greedy, None)
        rewards = [sum(ep.rewards) for ep in episodes]
        return {"eval/reward": float(np.mean(rewards)), "eval/version": self.engine.version,
                "eval/seconds": time.perf_counter() - t0}

    def _play(self, make_env, seeds, G: int, sampling: SamplingParams,
              between_steps) -> list["_Episode"]:
        """G episodes per seed, played to the end. Every turn is one engine call over the
        episodes still running: the policy's completion goes to the environment, whose
        observation (if the episode goes on) is appended with loss_mask 0 and version -1, and
        the next turn generates from the whole conversation. Single-turn tasks are done after
        the first turn (one engine call)."""
        env_cfg, episodes = self.cfg.env, []
        for g, seed in enumerate(seeds):
            envs = [make_env() for _ in range(G)]
            prompts = [env.reset(int(seed)) for env in envs]  # one prompt per group
            messages = messages_of(prompts[0], env_cfg.system_prompt, env_cfg.chat)
            ids = np.asarray(prompt_ids(self.tokenizer, prompts[0], messages), np.int32)
            episodes += [_Episode(g, env, ids, messages) for env in envs]  # tokenized once
        active = episodes
        while active:
            t0 = time.perf_counter()
            completions = self.engine.generate([ep.context() for ep in active], sampling,
                                               between_steps=between_steps)
            gen_s = (time.perf_counter() - t0) / len(completions)
            texts = self.tokenizer.batch_decode([c.token_ids for c in completions],
                                                skip_special_tokens=True)
            delays = [self.latency(self.latency_rng) for _ in active]
            steps = [_start_step(ep.env, text, d, self.pool)
                     for ep, text, d in zip(active, texts, delays)]
            start, timeout = time.perf_counter(), env_cfg.timeout_s or None
            for ep, c, text, step in zip(active, completions, texts, steps):
                ep.timings["generate"] += gen_s
                ep.add(c.token_ids, c.logprobs, c.versions, policy=True)
                left = None if timeout is None else max(0.0, start + timeout - time.perf_counter())
                try:
                    result = step.result(timeout=left)
                except TimeoutError:
                    ep.finish = "timeout"
                    self.counts["env_timeouts"] += 1
                    continue
                except Exception:  # a bad environment or reward function costs its group
                    ep.finish = "error"
                    continue
                self._turn(ep, c, text, *result)
            active = [ep for ep in active if ep.finish is None]
        return episodes

    def _turn(self, ep: "_Episode", c, text: str, obs, reward, done, info, env_s: float) -> None:
        """Record the environment's answer to a turn; append its observation if it goes on
        (in a chat, as a message rendered by the template, with the turn markup around it)."""
        ep.timings["env"] += env_s
        ep.rewards.append(float(reward))
        ep.info.update(info or {})
        if done or obs is None:
            ep.finish = c.finish_reason
        elif len(ep.rewards) >= self.cfg.env.max_turns:
            ep.finish = "max_turns"
        else:
            if ep.history is None:
                ids = self.tokenizer(obs, add_special_tokens=False)["input_ids"]
            else:
                eos = len(c.token_ids) > 0 and int(c.token_ids[-1]) == self.tokenizer.eos_token_id
                ids = between_turns(self.tokenizer, ep.history, obs, eos)
                ep.history += [{"role": "assistant", "content": text},
                               obs if isinstance(obs, dict) else {"role": "user", "content": obs}]
            ep.add(np.asarray(ids, np.int32), None, None, policy=False)
            if self.cfg.env.max_tokens and ep.length >= self.cfg.env.max_tokens:
                ep.finish = "length"

    def _groups(self, episodes: list["_Episode"], G: int) -> list[list[Trajectory]]:
        """Trajectories grouped by prompt; a group with a failed episode is dropped (counted)."""
        groups = []
        for g in range(0, len(episodes), G):
            eps = episodes[g:g + G]
            if any(ep.finish == "error" for ep in eps):
                self.counts["env_errors"] += 1
                continue
            group_id = f"{self.actor_id}-{uuid.uuid4().hex[:12]}"
            groups.append([ep.trajectory(f"{group_id}-{k}", group_id, self.cfg.env.name)
                           for k, ep in enumerate(eps)])
            self.counts["trajectories"] += len(eps)
        return groups


def _start_step(env, text: str, delay: float, pool: "_StepPool | None") -> Future:
    """A Future of `_timed_step`: on the pool's threads, or run inline (already done)."""
    if pool is not None:
        return pool.submit(partial(_timed_step, env, text, delay))
    fut: Future = Future()
    try:
        fut.set_result(_timed_step(env, text, delay))
    except Exception as e:
        fut.set_exception(e)
    return fut


class _StepPool:
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
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)
            with self.lock:
                self.idle += 1


def _timed_step(env, text: str, delay: float):
    """One environment step after `delay` seconds of simulated latency (on a pool thread)."""
    t0 = time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    obs, reward, done, info = env.step(text)
    return obs, reward, done, info, time.perf_counter() - t0


class _Episode:
    """One episode being generated: the prompt, then policy and environment tokens in turn."""

    def __init__(self, group: int, env, prompt_ids: np.ndarray, messages=None):
        self.group, self.env, self.prompt_ids = group, env, prompt_ids
        self.history = None if messages is None else list(messages)  # a chat's messages so far
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.rewards: list[float] = []
        self.info: dict = {}
        self.timings = {"generate": 0.0, "env": 0.0}
        self.finish: str | None = None
        self.length = 0

    def add(self, ids, logprobs, versions, policy: bool) -> None:
        n = len(ids)
        self.parts.append((np.asarray(ids, np.int32),
                           np.full(n, int(policy), np.int8),
                           np.asarray(logprobs, np.float32) if policy else np.zeros(n, np.float32),
                           np.asarray(versions, np.int32) if policy else np.full(n, -1, np.int32)))
        self.length += n

    def context(self) -> list[int]:
        """Prompt and every token so far: what the next turn generates from."""
        return np.concatenate([self.prompt_ids] + [p[0] for p in self.parts]).tolist()

    def trajectory(self, id: str, group_id: str, env_name: str) -> Trajectory:
        ids, mask, lp, versions = (np.concatenate(x) for x in zip(*self.parts))
        return Trajectory(
            id=id, group_id=group_id, prompt_ids=self.prompt_ids, completion_ids=ids,
            loss_mask=mask, behavior_logprobs=lp, versions=versions,
            reward=float(sum(self.rewards)), env=env_name, finish_reason=self.finish,
            timings=self.timings,
            info={**self.info, "turns": len(self.rewards), "turn_rewards": self.rewards}
            if len(self.rewards) > 1 else self.info)
