"""Roles without Ray: the HF engine's log-probs, a rollout actor, a learner step."""

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from offpolicy.actors.engine import SamplingParams
from offpolicy.actors.hf import HFEngine
from offpolicy.actors.rollout import BatchResult, RolloutActor
from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.learner.learner import Learner
from offpolicy.algorithms.losses import LOSSES
from offpolicy.algorithms.logprobs import token_logprobs
from offpolicy.models.loading import load_policy
from offpolicy.core.types import Batch, Trajectory
from offpolicy.weights.sync import LocalSync, cpu_state

from conftest import fast_config


def test_engine_logprobs_match_the_learner(model_dir):
    engine = HFEngine(str(model_dir), seed=0)
    prompts = [engine.tokenizer(p)["input_ids"] for p in ["1+2=", "47+85=", "9+10="] * 4]
    for temperature in (1.0, 0.7):
        outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=6))
        assert _learner_logprobs(engine, prompts, outs, temperature) < 1e-4
        assert all(c.finish_reason in ("stop", "length") for c in outs)


def test_rollout_actor_tags_versions_and_loads_weights(model_dir):
    cfg = fast_config(model_dir)
    buf, sync = ReplayBuffer(4, max_staleness=8, capacity=1000), LocalSync()
    actor = RolloutActor(cfg, 0, str(model_dir), buf, sync)
    actor.run(max_steps=1)
    state = cpu_state(actor.engine.model)
    state = {k: v + 0.01 for k, v in state.items()}
    sync.publish(state, 3)
    buf.publish(3)
    actor.run(max_steps=2)
    batch = buf.sample(version=3, timeout=0)
    groups = {}
    for t in batch.trajectories:
        groups.setdefault(t.group_id, []).append(t)
        assert len(t.versions) == len(t.completion_ids) == len(t.behavior_logprobs)
    assert all(len(g) == cfg.rollout.group_size for g in groups.values())
    assert all(len({t.prompt_ids.tobytes() for t in g}) == 1 for g in groups.values())
    assert actor.engine.version == 3 and actor.counts["weight_loads"] == 1
    versions = sorted({int(t.versions[0]) for t in batch.trajectories}
                      | {int(t.versions[0]) for t in buf.sample(3, timeout=0).trajectories})
    assert versions == [0, 3]


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_learner_step_changes_parameters_and_publishes(model_dir, loss):
    cfg = fast_config(model_dir, f"loss.name={loss}")
    buf, sync = ReplayBuffer(4, max_staleness=2, capacity=1000), LocalSync()
    actor = RolloutActor(cfg, 0, str(model_dir), buf, sync)
    learner = Learner(cfg, str(model_dir), buf, sync)
    groups = actor.rollout_batch()
    for g in groups:  # the random model never answers right: give each group some signal
        g[0].reward = 1.0
    buf.add(groups)
    before = cpu_state(learner.model)
    metrics = learner.step()
    after = cpu_state(learner.model)
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 0
    assert learner.version == 1 and sync.version == 1 and buf.published == 1
    assert metrics["staleness/max"] == 0 and metrics["rollout/reward_mean"] == 0.25
    assert metrics["learner/lr"] == cfg.learner.lr  # constant schedule
    # Same weights sampled and scored the batch: every IS ratio is 1 up to float error.
    assert abs(metrics["is/ratio_mean"] - 1.0) < 1e-4 and metrics["is/ratio_max"] < 1.001


def test_learning_rate_schedules_by_hand():
    from offpolicy.runtime.validate import load_config
    from offpolicy.learner.learner import lr_at

    def lrs(schedule, *extra):
        lc = load_config(None, [f"learner.lr_schedule={schedule}", "learner.steps=10",
                                "learner.lr=1.0", *extra]).learner
        return [lr_at(lc, v) for v in range(10)]

    assert lrs("constant") == [1.0] * 10
    assert lrs("linear") == pytest.approx([1 - v / 10 for v in range(10)])
    # warm-up 2 steps (0.5, 1.0), then a half cosine from 1.0 over 8 steps to min_lr_ratio 0.2
    cos = lrs("cosine", "learner.warmup_steps=2", "learner.min_lr_ratio=0.2")
    assert cos[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert cos[6] == pytest.approx(0.2 + 0.8 * 0.5)  # half way: (1 + cos(pi/2)) / 2
    assert cos[9] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_kl_penalty_and_entropy_bonus_in_a_learner_step(model_dir):
    """The reference is the base model: at the first step the policy equals it, so kl/ref is 0;
    once the policy moved, it is > 0. Entropy is logged with or without the bonus, and the
    bonus changes the update."""
    updates = {}
    for name, extra in {"plain": [], "bonus": ["loss.entropy_coef=0.5"],
                        "kl": ["loss.kl_coef=0.1", "loss.kl_estimator=k2"]}.items():
        cfg = fast_config(model_dir, "loss.name=pg", *extra)
        buf, sync = ReplayBuffer(4, max_staleness=2, capacity=1000), LocalSync()
        actor = RolloutActor(cfg, 0, str(model_dir), buf, sync)
        learner = Learner(cfg, str(model_dir), buf, sync)
        assert (learner.reference is not None) == (name == "kl")
        torch.manual_seed(1)
        groups = actor.rollout_batch()
        for g in groups:
            g[0].reward = 1.0
        buf.add(groups)
        before = cpu_state(learner.model)
        m = learner.step()
        assert 0 < m["learner/entropy"] <= np.log(len(learner.tokenizer)) + 1e-4
        updates[name] = torch.cat([(cpu_state(learner.model)[k] - before[k]).flatten()
                                   for k in before])
        if name == "kl":
            assert m["kl/ref"] == pytest.approx(0.0, abs=1e-6)
            groups = actor.rollout_batch()
            for g in groups:
                g[0].reward = 1.0
            buf.add(groups)
            assert learner.step()["kl/ref"] > 0
        else:
            assert "kl/ref" not in m
    assert not torch.allclose(updates["plain"], updates["bonus"])
    # kl at step 1 is 0 and so is its gradient (k2's is log r): the same update as plain pg
    assert torch.allclose(updates["plain"], updates["kl"], atol=1e-7)


# Losses averaged over sequences rather than tokens: chunks weighted by their token share are
# only close to the full batch for them (see Learner._backward).
SEQUENCE_MEAN = {"gspo", "oapl", "vcpo"}


def _learner_with_a_batch(model_dir, *overrides):
    """A learner whose buffer holds one batch from a rollout actor: the first answer of each
    group rewarded, so every group carries signal."""
    cfg = fast_config(model_dir, *overrides)
    buf, sync = ReplayBuffer(4, max_staleness=2, capacity=1000), LocalSync()
    actor = RolloutActor(cfg, 0, str(model_dir), buf, sync)
    learner = Learner(cfg, str(model_dir), buf, sync)
    torch.manual_seed(1)
    groups = actor.rollout_batch()
    for g in groups:
        g[0].reward = 1.0
    buf.add(groups)
    return learner


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - SEQUENCE_MEAN))
def test_micro_batches_give_the_full_batch_gradient(model_dir, loss):
    """Token-mean losses: accumulating chunks weighted by their token share is exact."""
    grads = []
    for micro in (0, 3):
        learner = _learner_with_a_batch(model_dir, f"loss.name={loss}",
                                        f"learner.micro_batch={micro}")
        learner.opt.step = lambda: None  # keep the weights: compare gradients only
        learner.step()
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_prioritized_replay_weights_scale_the_gradient(model_dir):
    """Batch.weights multiply the advantages: weight 2 everywhere doubles the pg gradient and
    weight 0 on a group removes that group's contribution."""
    cfg = fast_config(model_dir, "loss.name=pg")
    buf, sync = ReplayBuffer(4, max_staleness=2, capacity=1000), LocalSync()
    actor = RolloutActor(cfg, 0, str(model_dir), buf, sync)
    learner = Learner(cfg, str(model_dir), buf, sync)
    learner.opt.step = lambda: None  # compare gradients only
    learner.cfg.learner.grad_clip = 0.0
    groups = actor.rollout_batch()
    for g in groups:
        g[0].reward = 1.0
    trajs = [t for g in groups for t in g]
    n = len(groups[0])

    def grad(weights):
        learner.buffer = type("B", (), {"sample": lambda self, v: Batch(trajs, 0, {}, weights),
                                        "publish": lambda self, v: None})()
        learner.step()
        return torch.cat([p.grad.flatten() for p in learner.model.parameters()])

    plain = grad(None)
    assert torch.allclose(grad(np.full(len(trajs), 2.0, np.float32)), 2 * plain, rtol=1e-4,
                          atol=1e-7)
    w = np.ones(len(trajs), np.float32)
    w[:n] = 0.0  # drop the first group
    rest = Batch(trajs[n:], 0)
    learner.buffer = type("B", (), {"sample": lambda self, v: rest,
                                    "publish": lambda self, v: None})()
    learner.step()
    without_first = torch.cat([p.grad.flatten() for p in learner.model.parameters()])
    # token-mean pg: the dropped group's tokens still count in the mean's denominator
    tokens_all = sum(int(t.loss_mask.sum()) for t in trajs)
    tokens_rest = sum(int(t.loss_mask.sum()) for t in trajs[n:])
    assert torch.allclose(grad(w), without_first * tokens_rest / tokens_all, rtol=1e-4,
                          atol=1e-7)


def test_file_sync_round_trip_keeps_tied_weights(model_dir, tmp_path):
    """Learner -> safetensors folder -> HF engine: both names of the tied embedding are written
    and come back tied and equal; the newest `keep` versions stay on disk."""
    from offpolicy.weights.store import WeightStore
    from offpolicy.weights.sync import FileSync

    engine = HFEngine(str(model_dir))
    model = load_policy(model_dir)[0]
    sync = FileSync(WeightStore(), tmp_path, keep=2)
    for version in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * version)
        state = cpu_state(model)
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
        sync.publish(state, version)
    sync._cleaner.join()  # old versions are deleted in the background
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000002", "v00000003"]
    assert sync.fetch(3) is None
    engine.load_weights(*sync.fetch(0))
    got = engine.model.state_dict()
    assert engine.version == 3 and all(torch.equal(got[k], state[k]) for k in state)
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()


def test_numpy_encoding_round_trips_dtypes_and_ties():
    """ObjectStoreSync's payload: exact values for float32 and bfloat16, one array for a tie,
    and arrays pickle (as the object store does) without losing any of that."""
    import pickle

    from offpolicy.weights.sync import from_numpy, to_numpy

    emb = torch.randn(5, 3)
    state = {"emb": emb, "head": emb, "w": torch.randn(2, 2).to(torch.bfloat16),
             "b": torch.arange(3, dtype=torch.float32)}
    arrays = pickle.loads(pickle.dumps(to_numpy(state), protocol=5))
    assert arrays["emb"][0] is arrays["head"][0]  # the tie is sent once
    back = from_numpy(arrays)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())


class _FakeLLM:
    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def collective_rpc(self, method, args=()):
        if method == self.fail_on:
            raise RuntimeError("nccl broke")
        self.calls.append((method, args))


def test_nccl_weight_rpc_holds_the_engine_from_start_to_finish(monkeypatch):
    """The CPU-checkable half of NCCLSync: actor i's rank offset, and that the engine lock is
    held from start_weight_update to finish (which sets the version) or released on error."""
    import threading
    from types import SimpleNamespace

    import ray

    from offpolicy.actors.vllm import VLLMEngine
    from offpolicy.weights.store import WeightStore
    from offpolicy.weights.sync import NCCLSync, _ActorsClient

    def make_actor(fail_on=None):
        engine = VLLMEngine.__new__(VLLMEngine)  # the weight-update half, without vLLM
        engine.lock, engine.llm, engine.version = threading.Lock(), _FakeLLM(fail_on), 0
        actor = RolloutActor.__new__(RolloutActor)
        actor.engine, actor.counts = engine, {"weight_loads": 0}
        return actor

    class Handle:  # what a Ray actor handle looks like to _ActorsClient
        def __init__(self, actor):
            self.weight_rpc = SimpleNamespace(remote=actor.weight_rpc)

    monkeypatch.setattr(ray, "get", lambda refs: refs)
    actors = [make_actor(), make_actor()]
    sync = NCCLSync(WeightStore(), tp=2)
    sync.attach([Handle(a) for a in actors])
    client = _ActorsClient(sync)
    client.init_weight_transfer_engine({"rank_offset": 1, "world_size": 5})
    assert [a.engine.llm.calls[0][1][0]["rank_offset"] for a in actors] == [1, 3]
    sync.version = 4
    client.start_weight_update()
    assert all(a.engine.lock.locked() for a in actors)  # no engine step can run now
    client.update_weights({"names": ["w"]})
    assert all(a.engine.lock.locked() and a.engine.version == 0 for a in actors)
    client.finish_weight_update()
    assert all(not a.engine.lock.locked() and a.engine.version == 4 for a in actors)
    assert all(a.counts["weight_loads"] == 1 for a in actors)
    assert actors[0].engine.llm.calls[-1] == ("finish_weight_update", ())
    broken = make_actor(fail_on="update_weights")
    broken.weight_rpc("start_weight_update")
    with pytest.raises(RuntimeError):
        broken.weight_rpc("update_weights", {})
    assert not broken.engine.lock.locked() and broken.engine.version == 0


def test_hf_engine_stop_strings_end_the_completion(model_dir):
    engine = HFEngine(str(model_dir), seed=0)
    prompt = [engine.tokenizer("12+34=")["input_ids"]]
    greedy = engine.generate(prompt, SamplingParams(max_new_tokens=6, greedy=True))[0]
    text = engine.tokenizer.decode(greedy.token_ids, skip_special_tokens=True)
    assert len(text) >= 3  # the random model does not stop by itself here
    stop = text[2]
    out = engine.generate(prompt, SamplingParams(max_new_tokens=6, greedy=True, stop=(stop,)))[0]
    got = engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert got == text[:text.index(stop) + 1] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.versions) == len(out.token_ids)


def _learner_logprobs(engine, contexts, outs, temperature=1.0):
    """Max |engine log-prob - learner log-prob| over the completions' tokens."""
    trajs = [Trajectory("t", "g", np.array(p, np.int32), c.token_ids,
                        np.ones(len(c.token_ids), np.int8), c.logprobs,
                        np.zeros(len(c.token_ids), np.int32), 0.0, "x", c.finish_reason)
             for p, c in zip(contexts, outs)]
    d = Batch(trajs, 0).padded(0).map(torch.from_numpy)
    lp = token_logprobs(engine.model, d.input_ids, d.attention_mask, d.targets,
                        temperature)
    return ((lp - d.behavior_logprobs).abs() * d.loss_mask).max().item()


def test_hf_engine_next_turn_reuses_the_previous_turns_keys_and_values(model_dir):
    """A call whose prompts all continue rows of the previous call encodes only the new
    tokens. Rows may come back reordered or dropped, and rows that stopped early leave
    masked gaps; the log-probs still match the learner's on the whole conversation."""
    engine = HFEngine(str(model_dir), seed=0)
    tok = engine.tokenizer
    prompts = [tok(p)["input_ids"] for p in ["1+2=", "47+85=", "9+10="] * 3]
    sampling = SamplingParams(max_new_tokens=5, stop=tuple("0123456789"))
    first = engine.generate(prompts, sampling)
    assert {len(c.token_ids) for c in first} != {5}  # some rows stopped early: gaps follow
    obs = tok(" no:", add_special_tokens=False)["input_ids"]
    pick = [4, 0, 7, 2, 2]  # reordered, some dropped, one twice
    contexts = [prompts[i] + first[i].token_ids.tolist() + obs for i in pick]
    second = engine.generate(contexts, sampling)
    assert engine.reused_calls == 1
    assert _learner_logprobs(engine, contexts, second) < 1e-4
    # greedy: the reused path and a fresh encoding of the same conversations agree exactly
    third_ctx = [c + s.token_ids.tolist() + obs for c, s in zip(contexts, second)]
    greedy = SamplingParams(max_new_tokens=4, greedy=True)
    reused = engine.generate(third_ctx, greedy)
    fresh = HFEngine(str(model_dir)).generate(third_ctx, greedy)
    assert engine.reused_calls == 2
    for a, b in zip(reused, fresh):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    # new weights make the cached keys/values stale: the next call encodes from scratch
    engine.load_weights(1, engine.model.state_dict())
    engine.generate([c + r.token_ids.tolist() for c, r in zip(third_ctx, reused)], greedy)
    assert engine.reused_calls == 2


class _AskThrice:
    """A scripted multi-turn environment: two observations, then a reward of 1 on turn 3."""

    def __init__(self, split="train", eval_size=0, endless=False):
        self.endless, self.turns, self.said = endless, 0, []

    def reset(self, seed):
        self.turns, self.said = 0, ["12+34="]
        return "12+34="

    def step(self, text):
        self.turns += 1
        self.said.append(text)
        if self.turns < 3 or self.endless:
            self.said.append(f" no{self.turns}:")
            return f" no{self.turns}:", 0.0, False, {}
        return None, 1.0, True, {"solved": True}


def test_multi_turn_episode_reconstructs_the_conversation_and_masks_env_tokens(model_dir):
    from offpolicy.envs import ENVS, register_env

    register_env("ask_thrice", _AskThrice)
    try:
        cfg = fast_config(model_dir, "env.name=ask_thrice", "rollout.prompts_per_batch=2")
        buf, sync = ReplayBuffer(2, max_staleness=2, capacity=1000), LocalSync()
        actor = RolloutActor(cfg, 0, str(model_dir), buf, sync)
        envs = []
        make = actor.make_env
        actor.make_env = lambda: envs.append(make()) or envs[-1]
        groups = actor.rollout_batch()
        tok = actor.tokenizer
        for t, env in zip([t for g in groups for t in g], envs):
            assert t.reward == 1.0 and t.info["turns"] == 3 and t.info["solved"]
            # the token sequence decodes to exactly what was said, in order
            assert tok.decode(np.concatenate([t.prompt_ids, t.completion_ids]),
                              skip_special_tokens=True) == "".join(env.said)
            env_tokens = [tok(f" no{k}:", add_special_tokens=False)["input_ids"] for k in (1, 2)]
            masked = t.completion_ids[t.loss_mask == 0].tolist()
            assert masked == env_tokens[0] + env_tokens[1]
            assert np.all(t.versions[t.loss_mask == 0] == -1)
            assert np.all(t.behavior_logprobs[t.loss_mask == 0] == 0)
        # the learner trains on policy tokens only
        learner = Learner(cfg, str(model_dir), buf, sync)
        for g in groups:
            g[0].reward = 0.0
        buf.add(groups)
        m = learner.step()
        assert m["learner/tokens"] == sum(int(t.loss_mask.sum()) for g in groups for t in g)
        assert m["rollout/turns"] == 3.0  # three runs of policy tokens per trajectory
        # an environment that never ends is cut at env.max_turns
        register_env("ask_thrice", lambda split="train", eval_size=0: _AskThrice(endless=True))
        cfg = fast_config(model_dir, "env.name=ask_thrice", "env.max_turns=2")
        actor = RolloutActor(cfg, 0, str(model_dir), buf, sync)
        t = actor.rollout_batch(1)[0][0]
        assert t.finish_reason == "max_turns" and t.info["turns"] == 2
    finally:
        ENVS.pop("ask_thrice", None)


class _Slow:
    """Sleeps `hang` seconds in every step; raises on demand."""

    def __init__(self, split="train", eval_size=0, hang=0.0, fail=False):
        self.hang, self.fail = hang, fail

    def reset(self, seed):
        return "12+34="

    def step(self, text):
        if self.fail:
            raise RuntimeError("reward function broke")
        time.sleep(self.hang)
        return None, 1.0, True, {}


def test_env_timeouts_and_errors_are_counted_and_latency_runs_concurrently(model_dir):
    from offpolicy.envs import ENVS, register_env

    def actor_for(*overrides, **env_kwargs):
        register_env("slow", lambda split="train", eval_size=0: _Slow(**env_kwargs))
        cfg = fast_config(model_dir, "env.name=slow", "rollout.prompts_per_batch=2", *overrides)
        buffer = ReplayBuffer(2, 2, 1000, group_size=cfg.rollout.group_size)
        return RolloutActor(cfg, 0, str(model_dir), buffer, LocalSync())

    try:
        actor = actor_for("env.timeout_s=0.3", hang=3.0)  # every step hangs past the timeout
        t0 = time.perf_counter()
        groups = actor.rollout_batch()
        assert time.perf_counter() - t0 < 2.5  # cut at the timeout, not after 8 x 3 s
        assert actor.counts["env_timeouts"] == 8
        assert all(t.finish_reason == "timeout" and t.reward == 0.0 for g in groups for t in g)
        actor = actor_for(fail=True)
        # every episode raised (8 counted), and each one costs its group: both are dropped
        assert actor.rollout_batch() == [] and actor.counts["env_errors"] == 8
        # through the buffer: the ledger counts the dropped episodes, and a cut one arrives
        assert actor.one_batch(timeout=0) is BatchResult.ADDED
        ledger = actor.buffer.ledger()
        assert (ledger["env_errors"], ledger["added"], ledger["balanced"]) == (8, 0, True)
        actor = actor_for("env.timeout_s=0.1", hang=1.0)
        assert actor.one_batch(timeout=0) is BatchResult.ADDED
        ledger = actor.buffer.ledger()
        assert (ledger["added"], ledger["in_buffer"], ledger["balanced"]) == (8, 8, True)
        # 8 steps of 0.4 s simulated latency overlap: far less than 3.2 s in sequence
        actor = actor_for("env.latency=fixed:0.4")
        t0 = time.perf_counter()
        groups = actor.rollout_batch()
        assert time.perf_counter() - t0 < 2.0 and len(groups) == 2
        assert all(t.timings["env"] >= 0.4 for g in groups for t in g)
        with pytest.raises(Exception, match="env.latency"):
            fast_config(model_dir, "env.latency=gamma:1")
    finally:
        ENVS.pop("slow", None)


def test_hf_engine_passes_the_cache_under_the_name_the_model_takes(model_dir):
    """transformers >= 5.2x calls it `cache` and warns on every `past_key_values` call (964
    warning lines in one quickstart); older versions only know `past_key_values`."""
    from offpolicy.algorithms.logprobs import cache_argument

    class New(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
            pass

    class Old(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
            pass

    assert cache_argument(New()) == "cache" and cache_argument(Old()) == "past_key_values"
    engine = HFEngine(str(model_dir), seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the installed version's name is used
        engine.generate([engine.tokenizer("1+2=")["input_ids"]], SamplingParams(max_new_tokens=3))


def test_minibatches_take_several_steps_per_version_and_decoupled_ppo_clips(model_dir):
    """With 4 minibatches one batch is 4 optimizer steps against one proximal policy: the
    later steps move the policy away from it, so the clip is active. With 1 it never is."""
    fracs = {}
    for n in (1, 4):
        learner = _learner_with_a_batch(model_dir, "loss.name=decoupled_ppo",
                                        f"learner.minibatches={n}", "learner.lr=3e-2")
        steps = []
        step = learner.opt.step
        learner.opt.step = lambda: (steps.append(1), step())
        m = learner.step()
        assert learner.version == 1 and len(steps) == n  # one version, n optimizer steps
        fracs[n] = m["is/clip_frac"]
    assert fracs[1] == 0.0 and fracs[4] > 0


def test_minibatch_rows_are_disjoint_and_cover_the_batch(model_dir):
    learner = _learner_with_a_batch(model_dir, "loss.name=pg", "learner.minibatches=3")
    seen, full = [], []
    backward, update = learner._backward, learner._update
    learner._backward = lambda d, adv: (seen.append(d.input_ids), backward(d, adv))[1]
    learner._update = lambda d, batch, spans: (full.append(d.input_ids),
                                               update(d, batch, spans))[1]
    learner.step()
    assert [len(s) for s in seen] == [6, 5, 5]
    assert sorted(map(tuple, torch.cat(seen).tolist())) == sorted(map(tuple, full[0].tolist()))


def test_ess_lr_scales_the_learning_rate_by_the_effective_sample_size(model_dir):
    """On-policy weights are all 1 (ESS = n, scale 1); skewed behaviour log-probs shrink it to
    the value computed by hand from the sequence weights."""
    learner = _learner_with_a_batch(model_dir, "loss.name=tis", "learner.ess_lr=sqrt")
    m = learner.step()
    assert m["learner/ess_lr_scale"] == pytest.approx(1.0, abs=1e-4)
    assert m["learner/lr"] == pytest.approx(1e-3 * m["learner/ess_lr_scale"])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    behavior = torch.zeros(3, 3)
    prox = torch.tensor([[0.0, math.log(3), 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    d = SimpleNamespace(loss_mask=mask, behavior_logprobs=behavior, proximal_logprobs=prox)
    # w = 3, 1, 1: ESS / n = 25 / (3 * 11)
    assert learner._ess_scale(d, prox) == pytest.approx(math.sqrt(25 / 33))
    learner.cfg.learner.ess_lr = "linear"
    assert learner._ess_scale(d, prox) == pytest.approx(25 / 33)


@pytest.mark.parametrize("loss", ["oapl", "asymre", "vcpo"])
def test_losses_with_their_own_advantages_train(model_dir, loss):
    learner = _learner_with_a_batch(model_dir, f"loss.name={loss}")
    before = cpu_state(learner.model)
    m = learner.step()
    assert np.isfinite(m["learner/loss"])
    assert any(not torch.equal(before[k], v) for k, v in cpu_state(learner.model).items())
    assert learner.needs_proximal == (loss == "vcpo")
