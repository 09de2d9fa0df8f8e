"""Behaviour the protocols promise that no other test pins down: publishing every
`sync_every` versions, top-p behaviour log-probs, FileSync's vanished-folder retry, the run
folder's refusal to mix runs, the parity history's pruning, and the NCCL and wandb paths with
their libraries stood in for (neither runs on this CPU machine for real)."""

import importlib.machinery
import math
import sys
import types

import numpy as np
import pytest
import torch

from offpolicy.actors.engine import ENGINES, Engine
from offpolicy.actors.hf import _sample
from offpolicy.actors.rollout import RolloutActor
from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.core.errors import ConfigError
from offpolicy.runtime.validate import load_config
from offpolicy.algorithms.logprobs import token_logprobs
from offpolicy.runtime.run_dir import prepare_run_dir
from offpolicy.config.plan import RunPlan
from offpolicy.runtime.serial_roles import SerialRoles
from offpolicy.core.types import Batch
from offpolicy.weights.store import WeightStore
from offpolicy.weights.sync import FileSync, LocalSync, NCCLSync, ObjectStoreSync, cpu_state

from conftest import fast_config


def test_every_engine_implements_the_protocol(model_dir):
    cfg = fast_config(model_dir)
    for name in sorted(set(ENGINES) - {"vllm"}):  # vLLM: tests/test_vllm.py
        engine = ENGINES[name](cfg, str(model_dir), 0)
        assert isinstance(engine, Engine) and engine.version == 0, name


def test_sync_every_publishes_every_nth_version_and_actors_only_hold_those(model_dir):
    cfg = fast_config(model_dir, "learner.sync_every=2", "buffer.max_staleness=1",
                      "buffer.drop_uniform_groups=false")
    session = SerialRoles(cfg, RunPlan.of(cfg), str(model_dir))
    published = []
    for step in range(1, 6):
        m = session.step()
        published.append(session.buffer.published)
        # tokens of update `step` (batch version step - 1) came from an even version
        token_versions = {step - 1 - int(s) for s in m["staleness/hist"]}
        assert all(v % 2 == 0 for v in token_versions), (step, token_versions)
        assert m["staleness/max"] <= 1
    assert published == [0, 2, 2, 4, 4]
    assert session.learner.weights.version == 4
    assert all(a.engine.version % 2 == 0 for a in session.actors)


def test_top_p_samples_and_scores_from_the_truncated_distribution():
    # p = 0.5, 0.3, 0.2 with top_p 0.6: the nucleus is {0, 1}, renormalised by 0.8
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    from offpolicy.actors.engine import SamplingParams

    torch.manual_seed(0)
    tok, lp = _sample(logits, SamplingParams(temperature=1.0, top_p=0.6))
    assert set(tok.tolist()) == {0, 1}
    expect = torch.log(torch.tensor([0.5 / 0.8, 0.3 / 0.8]))[tok]
    assert torch.allclose(lp, expect, atol=1e-6)
    assert abs((tok == 0).float().mean().item() - 0.625) < 0.03


def test_top_p_behaviour_logprobs_exceed_the_full_distributions(model_dir):
    """On a real engine: each sampled token's behaviour log-prob is its log-prob within the
    nucleus, so at least the full distribution's (what the learner scores), and above it
    whenever the nucleus left some mass out."""
    cfg = fast_config(model_dir, "engine.top_p=0.3")
    actor = RolloutActor(cfg, 0, str(model_dir), ReplayBuffer(4, 2, 1000), LocalSync())
    trajs = [t for g in actor.rollout_batch() for t in g]
    d = Batch(trajs, 0).padded(actor.tokenizer.pad_token_id).map(torch.from_numpy)
    with torch.no_grad():
        full = token_logprobs(actor.engine.model, d.input_ids, d.attention_mask,
                              d.targets, 1.0)
    mask = d.loss_mask.bool()
    gap = (d.behavior_logprobs - full)[mask]
    assert (gap > -1e-4).all()
    assert (gap > 0.1).float().mean() > 0.9  # a random model is nearly uniform: Z << 1


def _actor_with(sync, model_dir):
    cfg = fast_config(model_dir)
    return RolloutActor(cfg, 0, str(model_dir), ReplayBuffer(4, 2, 1000), sync)


def test_filesync_fetches_again_when_the_folder_vanished(model_dir, tmp_path):
    sync = FileSync(WeightStore(), tmp_path / "w", keep=1)
    actor = _actor_with(sync, model_dir)
    state = cpu_state(actor.engine.model)
    sync.publish(state, 1)
    fetched, real_fetch = [], sync.fetch

    def fetch(have, want=None):
        got = real_fetch(have, want)
        fetched.append(got[0])
        if len(fetched) == 1:  # the learner moves on before the actor reads version 1
            sync.publish(state, 2)
            sync._cleaner.join()
            assert not (tmp_path / "w" / "v00000001").exists()
        return got

    sync.fetch = fetch
    assert actor.sync_weights() and actor.engine.version == 2 and fetched == [1, 2]


def test_filesync_rewrites_the_folder_past_keep_in_place_and_falls_back_on_a_new_layout(
        tmp_path):
    """One machine (`recycle`): the folder that falls out of the newest `keep` is renamed and
    its file overwritten (the same file: no new memory), with exactly the new values; a state
    of another layout gets a fresh file."""
    from safetensors.torch import load, load_file

    sync = FileSync(WeightStore(), tmp_path, keep=2, recycle=True)
    emb = torch.randn(8, 4)

    def state(v, extra=False):
        out = {"model.embed_tokens.weight": emb + v, "w": torch.full((3,), float(v))}
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied
        return {**out, "b": torch.ones(2, dtype=torch.bfloat16)} if extra else out

    sync.publish(state(1), 1)
    sync.publish(state(2), 2)
    with open(tmp_path / "v00000001" / "model.safetensors", "rb") as first:
        for v in (3, 4):
            sync.publish(state(v), v)
            sync._cleaner.join()
        reread = load(first.read())  # the same file, so now version 3's values
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000003", "v00000004"]
    for v, got in ((3, reread), (4, load_file(str(tmp_path / "v00000004" / "model.safetensors")))):
        assert got.keys() == state(v).keys() and all(torch.equal(got[k], state(v)[k]) for k in got)
    sync.publish(state(5, extra=True), 5)  # another layout: written afresh
    sync._cleaner.join()
    got = load_file(str(tmp_path / "v00000005" / "model.safetensors"))
    assert torch.equal(got["b"], torch.ones(2, dtype=torch.bfloat16))
    assert torch.equal(got["w"], torch.full((3,), 5.0)) and not (tmp_path / "v00000003").exists()


def test_filesync_rewrites_in_place_only_under_a_private_ray(tmp_path, monkeypatch):
    """A cluster's shared folder may show another node a rename late (NFS caches attributes),
    so a read that overlapped a rewrite would go unnoticed: fresh files there."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def built(*overrides):
        cfg = load_config(None, ["engine.name=vllm", *overrides])
        return FileSync.build(cfg, RunPlan.of(cfg), WeightStore(), tmp_path).recycle

    assert built() and not built("cluster.address=10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # inside `ray job submit`
    assert not built()


def test_an_actor_whose_folder_was_reused_during_its_read_loads_the_newer_one(
        model_dir, tmp_path):
    sync = FileSync(WeightStore(), tmp_path / "w", keep=1, recycle=True)
    actor = _actor_with(sync, model_dir)
    state = cpu_state(actor.engine.model)
    sync.publish(state, 1)
    loaded, real_load = [], actor.engine.load_weights

    def load(version, source):
        real_load(version, source)
        loaded.append(version)
        if version == 1:  # the learner reuses the folder while the actor still reads it
            sync.publish(state, 2)
            assert (tmp_path / "w" / "v00000002").exists() and sync.vanished(source)

    actor.engine.load_weights = load
    assert actor.sync_weights() and actor.engine.version == 2 and loaded == [1, 2]
    assert actor.counts["weight_loads"] == 1


def test_filesync_gives_up_after_three_vanished_folders_and_reraises_real_errors(
        model_dir, tmp_path):
    sync = FileSync(WeightStore(), tmp_path / "w")
    actor = _actor_with(sync, model_dir)
    sync.fetch = lambda have, want=None: (5, str(tmp_path / "gone"))
    with pytest.raises(RuntimeError, match="vanished 3 times"):
        actor.sync_weights()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    sync.fetch = lambda have, want=None: (5, str(bad))
    with pytest.raises(Exception) as info:
        actor.sync_weights()
    assert "vanished" not in str(info.value) and actor.engine.version == 0


def test_a_run_folder_is_never_reused_silently(tmp_path, monkeypatch):
    run = tmp_path / "r"
    prepare_run_dir(load_config(None, [f"run.dir={run}"]))
    assert (run / "config.yaml").is_file()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(load_config(None, [f"run.dir={run}"]))
    assert (run / "metrics.jsonl").exists()  # refused: nothing touched
    prepare_run_dir(load_config(None, [f"run.dir={run}", "run.overwrite=true"]))
    assert not (run / "metrics.jsonl").exists()
    monkeypatch.chdir(tmp_path)  # no run.dir: runs/<name>, then runs/<name>-2
    first = prepare_run_dir(load_config(None, ["run.name=x"]))
    second = prepare_run_dir(load_config(None, ["run.name=x"]))
    assert (first.name, second.name) == ("x", "x-2")


def test_parity_history_keeps_only_versions_data_can_still_come_from(model_dir):
    cfg = fast_config(model_dir, "engine.logprob_check_every=1", "buffer.max_staleness=2",
                      "buffer.drop_uniform_groups=false")
    session = SerialRoles(cfg, RunPlan.of(cfg), str(model_dir))
    for _ in range(8):
        m = session.step()
        assert m["engine/logprob_abs_diff"] < 1e-4
    # version 8 - max_staleness - sync_every = 5 is the oldest an actor may still sample with
    assert sorted(session.learner.parity.history) == [5, 6, 7, 8]


def _stub_modules(monkeypatch, modules: dict[str, dict]) -> None:
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)


def test_nccl_sync_connects_and_publishes_through_vllms_trainer_engine(monkeypatch):
    """NCCLSync.connect and publish with vLLM's weight-transfer engine stood in for: the
    trainer is rank 0 of 1 + actors x tp ranks, its init reaches every actor with its offset,
    and a publish broadcasts once and records the version."""
    made = {}

    class TrainerEngine:
        @classmethod
        def trainer_init(cls, info, client, source):
            made.update(info=info, client=client, source=source, sent=0)
            client.init_weight_transfer_engine({"rank_offset": 1})
            return cls()

        def send_weights(self):
            made["sent"] += 1

    _stub_modules(monkeypatch, {
        "vllm": {}, "vllm.distributed": {}, "vllm.distributed.weight_transfer": {},
        "vllm.distributed.weight_transfer.base": {"ModuleSource": lambda m: ("source", m)},
        "vllm.distributed.weight_transfer.nccl_engine": {
            "NCCLTrainerInitInfo": lambda **kw: kw,
            "NCCLTrainerWeightTransferEngine": TrainerEngine},
        "vllm.utils": {}, "vllm.utils.network_utils": {"get_ip": lambda: "10.0.0.1",
                                                       "get_open_port": lambda: 4321}})
    import ray

    monkeypatch.setattr(ray, "get", lambda refs: refs)
    calls = []

    class Handle:  # a rollout actor's handle as _ActorsClient calls it
        def __init__(self, i):
            self.weight_rpc = types.SimpleNamespace(
                remote=lambda method, *args: calls.append((i, method, args)))

    store = WeightStore()
    sync = NCCLSync(store, tp=2)
    sync.attach([Handle(0), Handle(1)])
    model = torch.nn.Linear(2, 2)
    sync.connect(model)
    assert made["info"] == {"master_address": "10.0.0.1", "master_port": 4321,
                            "world_size": 5, "rank": 0}
    assert made["source"] == ("source", model)
    assert [(i, args[0]["rank_offset"]) for i, _, args in calls] == [(0, 1), (1, 3)]
    sync.publish(None, 3)
    assert made["sent"] == 1 and store.latest()[0] == 3
    assert sync.fetch(0) is None and not sync.needs_cpu_state


def test_pull_syncs_declare_the_protocol(tmp_path):
    store = WeightStore()
    for sync in (LocalSync(), FileSync(store, tmp_path), ObjectStoreSync(store)):
        assert sync.needs_cpu_state and not sync.vanished(str(tmp_path))
        sync.connect(torch.nn.Linear(1, 1))  # nothing to connect
    assert FileSync(store, tmp_path).vanished(str(tmp_path / "gone"))


def test_wandb_backend_logs_scalars_and_finishes(monkeypatch, tmp_path):
    """The wandb backend through MetricsWriter, with the wandb package stood in for."""
    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, scalars, step):
            self.logged.append((step, scalars))

        def finish(self):
            self.finished = True

    _stub_modules(monkeypatch, {"wandb": {"init": lambda **kw: Run(**kw)}})
    from offpolicy.runtime.metrics import MetricsWriter, make_backends

    cfg = load_config(None, ["log.wandb=true", "log.wandb_project=p", "run.name=r"])
    writer = MetricsWriter(tmp_path, 2, backends=make_backends(cfg, tmp_path),
                           out=open("/dev/null", "w"))
    metrics = {"step": 1, "rollout/reward_mean": 0.5, "staleness/mean": 1.0,
               "staleness/max": 2, "is/ratio_mean": 1.0, "throughput/samples_per_s": 3.0,
               "time/elapsed_s": 1.0, "staleness/hist": {"1": 3}, "x/nan": math.nan}
    writer.write(metrics)
    writer.close()
    (run,) = runs
    assert run.kwargs["project"] == "p" and run.kwargs["config"]["run"]["name"] == "r"
    step, scalars = run.logged[0]
    assert step == 1 and scalars["rollout/reward_mean"] == 0.5 and scalars["staleness/max"] == 2
    assert "staleness/hist" not in scalars and "x/nan" not in scalars and "step" not in scalars
    assert run.finished
    assert np.isfinite(list(scalars.values())).all()


def test_a_serial_run_never_imports_ray(model_dir, tmp_path):
    """resources.serial: every role in one process, and Ray is not even imported."""
    import subprocess

    code = ("import sys\n"
            "from offpolicy.runtime.validate import load_config\n"
            "from offpolicy.runtime.launch import train\n"
            f"cfg = load_config(None, ['model.path={model_dir}', 'resources.serial=true',\n"
            "    'learner.steps=2', 'eval.every=2', 'env.eval_size=4', 'learner.batch_groups=2',\n"
            "    'rollout.prompts_per_batch=2', 'rollout.group_size=2',\n"
            f"    'buffer.drop_uniform_groups=false', 'run.dir={tmp_path / 'run'}'])\n"
            "summary = train(cfg, log=lambda *a: None)\n"
            "assert summary['steps'] == 2, summary\n"
            "print('ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def _members(protocol) -> set[str]:
    """The names a Protocol class declares: methods, properties and annotated attributes."""
    own = {k for k in vars(protocol) if not k.startswith("_")}
    return own | set(getattr(protocol, "__annotations__", {}))


def test_the_stores_and_the_layouts_have_every_member_of_their_protocols():
    from offpolicy.buffer.bound import BoundStore
    from offpolicy.buffer.lag import LagStore
    from offpolicy.buffer.store import Store
    from offpolicy.runtime.layout import Layout
    from offpolicy.runtime.ray_roles import RayRoles

    for store in (BoundStore(2, 1, 100), LagStore(2, 1)):
        missing = sorted(m for m in _members(Store) if not hasattr(store, m))
        assert not missing, (type(store).__name__, missing)
    for layout in (SerialRoles, RayRoles):
        missing = sorted(m for m in _members(Layout) if not callable(getattr(layout, m, None)))
        assert not missing, (layout.__name__, missing)


def test_the_eval_desk_hands_a_request_to_actor_0_once_and_again_after_its_death():
    from offpolicy.core.types import Incarnation
    from offpolicy.runtime.desk import Desk

    desk, first, other = Desk(), Incarnation(0, "a"), Incarnation(1, "a")
    assert not desk.take(first)  # nothing asked yet
    desk.request()
    assert not desk.take(other) and desk.take(first) and not desk.take(first)  # once, actor 0
    assert not desk.take(Incarnation(0, "a"))  # the same incarnation is still evaluating
    assert desk.take(Incarnation(0, "b"))  # a new incarnation of actor 0: the old one died
    desk.report({"eval/reward": 0.5, "eval/version": 3})
    assert desk.results() == [{"eval/reward": 0.5, "eval/version": 3}] and desk.results() == []
