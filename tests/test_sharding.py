"""learner.sharding=fsdp: FSDP2 workers (gloo on CPU) against one unsharded worker: the same
step, half the storage each, sharded checkpoints that load with any number of workers."""

import json
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from offpolicy.actors.rollout import RolloutActor
from offpolicy.core.errors import ConfigError
from offpolicy.learner import sharding
from offpolicy.learner.learner import Learner
from offpolicy.runtime import validate
from offpolicy.core.types import Batch
from offpolicy.weights.sync import LocalSync, cpu_state

from conftest import QUICKSTART, OneBatch, fast_config


@pytest.fixture(scope="module")
def batch_file(model_dir, tmp_path_factory):
    """One rollout batch of the random model, with some reward signal in each group."""
    cfg = fast_config(model_dir, "engine.logprob_check_every=0")
    groups = RolloutActor(cfg, 0, str(model_dir), None, LocalSync()).rollout_batch()
    for g in groups:
        g[0].reward = 1.0
    path = tmp_path_factory.mktemp("batch") / "batch.pkl"
    path.write_bytes(pickle.dumps(Batch([t for g in groups for t in g], 0)))
    return path


def _config(model_dir, sharded: bool, workers: int, *extra):
    return fast_config(model_dir, "loss.name=tis", "engine.logprob_check_every=0",
                       f"resources.learner_workers={workers}",
                       f"learner.sharding={'fsdp' if sharded else 'none'}", *extra)


def _grads(learner) -> dict[str, torch.Tensor]:
    """Full gradients by name (a collective when sharded)."""
    out = {}
    for name, p in learner.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = g.detach().clone()
    return out


def _worker(rank, world, cfg, model_dir, batch_file, out_dir, save, load):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous-{world}",
                            rank=rank, world_size=world)
    try:
        batch = pickle.load(open(batch_file, "rb")) if rank == 0 else None
        learner = Learner(cfg, str(model_dir), OneBatch(batch), LocalSync())
        if load:
            learner.load_state(load)
        before = sharding.storage_bytes(learner.model, learner.opt)
        metrics = learner.step()
        result = {"metrics": metrics, "grads": _grads(learner), "version": learner.version,
                  "before": before, "after": sharding.storage_bytes(learner.model, learner.opt),
                  "state": sharding.full_state(learner.model, keep=rank == 0)[0]}
        if save:
            learner.save_state(save)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def _one(cfg, model_dir, batch_file, load=None, save=None):
    learner = Learner(cfg, str(model_dir), OneBatch(pickle.loads(batch_file.read_bytes())),
                      LocalSync())
    if load:
        learner.load_state(load)
    metrics = learner.step()
    if save:
        learner.save_state(save)
    return {"metrics": metrics, "grads": _grads(learner), "state": cpu_state(learner.model),
            "version": learner.version,
            "storage": sharding.storage_bytes(learner.model, learner.opt)}


def _spawn(cfg, model_dir, batch_file, out, world=2, save=None, load=None):
    out.mkdir(exist_ok=True)
    mp.spawn(_worker, args=(world, cfg, model_dir, str(batch_file), str(out), save, load),
             nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_same_step(one, sharded):
    m = sharded["metrics"]
    assert m["learner/loss"] == pytest.approx(one["metrics"]["learner/loss"], abs=1e-5)
    assert m["learner/grad_norm"] == pytest.approx(one["metrics"]["learner/grad_norm"],
                                                   abs=1e-5)
    for k, g in one["grads"].items():
        torch.testing.assert_close(sharded["grads"][k], g, atol=1e-5, rtol=1e-5)
    for k, v in one["state"].items():
        torch.testing.assert_close(sharded["state"][k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra", [(), ("learner.micro_batch=3", "learner.minibatches=2")])
def test_two_fsdp_workers_match_one_unsharded_worker(model_dir, batch_file, tmp_path, extra):
    one = _one(_config(model_dir, False, 1, *extra), model_dir, batch_file)
    ranks = _spawn(_config(model_dir, True, 2, *extra), model_dir, batch_file, tmp_path)
    _assert_same_step(one, ranks[0])
    assert ranks[1]["state"] is None  # only rank 0 keeps the gathered weights
    assert any(not torch.equal(v, cpu_state(Learner(
        _config(model_dir, False, 1), str(model_dir), OneBatch(None), LocalSync()).model)[k])
        for k, v in ranks[0]["state"].items())  # the step changed the weights
    # each worker stores about half of the parameters, gradients and AdamW moments
    for r in ranks:
        for part in ("params", "grads", "optimizer"):
            ratio = r["after"][part] / one["storage"][part]
            assert 0.45 <= ratio <= 0.6, (part, ratio)


def test_sharded_checkpoint_resumes_with_two_workers_or_one_unsharded(model_dir, batch_file,
                                                                      tmp_path):
    """Two FSDP workers save after a step; two FSDP workers and one unsharded learner each
    resume from it: the same version and the same next step (resharding works)."""
    ck = tmp_path / "ck"
    first = _spawn(_config(model_dir, True, 2), model_dir, batch_file, tmp_path / "a",
                   save=str(ck))
    assert sorted(p.name for p in (ck / "optimizer").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert torch.load(ck / "learner.pt", weights_only=False)["workers"] == 2
    # the policy was saved whole, as a Hugging Face folder (resume builds the learner from it)
    resumed_model = str(ck / "model")
    saved = Learner(_config(model_dir, False, 1), resumed_model, OneBatch(None),
                    LocalSync()).model.state_dict()
    assert saved.keys() == first[0]["state"].keys()
    assert all(torch.equal(saved[k], v) for k, v in first[0]["state"].items())
    two = _spawn(_config(model_dir, True, 2), resumed_model, batch_file, tmp_path / "b",
                 load=str(ck))
    one = _one(_config(model_dir, False, 1), resumed_model, batch_file, load=str(ck))
    assert one["version"] == two[0]["version"] == 2
    _assert_same_step(one, two[0])


def test_sharding_bad_input_is_one_line(model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="nccl"):
        fast_config(model_dir, "learner.sharding=fsdp", "engine.weight_sync=nccl")
    with pytest.raises(ConfigError, match="fsdp_cpu_offload: offloads from a GPU"):
        fast_config(model_dir, "learner.sharding=fsdp", "learner.fsdp_cpu_offload=true")
    with pytest.raises(ConfigError, match="micro_batch=1"):
        fast_config(model_dir, "learner.sharding=fsdp", "resources.learner_workers=3",
                    "learner.micro_batch=1")
    monkeypatch.setattr(validate, "fsdp_available", lambda: False)
    with pytest.raises(ConfigError, match="has no FSDP2"):
        fast_config(model_dir, "learner.sharding=fsdp")


def test_a_model_without_transformer_blocks_is_refused_before_anything_starts(model_dir,
                                                                               monkeypatch):
    from offpolicy.runtime.preflight import preflight

    cfg = fast_config(model_dir, "learner.sharding=fsdp")
    preflight(cfg, model_dir)  # the tiny Llama has blocks
    monkeypatch.setattr(sharding, "transformer_blocks", lambda model: [])
    with pytest.raises(ConfigError, match="no transformer blocks found in"):
        preflight(cfg, model_dir)


def test_a_sharded_serial_run_resumes_through_the_cli(model_dir, tmp_path, capsys):
    """`offpolicy train` with learner.sharding=fsdp in one process (a group of one) writes
    sharded checkpoints; `--resume` continues from one, and an unsharded checkpoint is refused
    to a sharded resume in one line."""
    from offpolicy.tools.cli import main

    common = [f"model.path={model_dir}", "rollout.prompts_per_batch=4", "rollout.group_size=4",
              "learner.batch_groups=4", "eval.every=4", "env.eval_size=8",
              "resources.serial=true", "checkpoint.every=2", "learner.steps=4"]
    run = tmp_path / "run"
    assert main(["train", str(QUICKSTART), *common, "learner.sharding=fsdp",
                 f"run.dir={run}"]) == 0
    assert (run / "checkpoints" / "step-000002" / "optimizer" / ".metadata").is_file()
    assert main(["train", "--resume", str(run), "learner.steps=6"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    plain = tmp_path / "plain"
    assert main(["train", str(QUICKSTART), *common, f"run.dir={plain}"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(plain), "learner.steps=6",
                 "learner.sharding=fsdp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written without sharding" in err


def test_bf16_mixed_precision_step_is_close_to_float32(model_dir, batch_file, tmp_path):
    one = _one(_config(model_dir, False, 1), model_dir, batch_file)
    bf16 = _spawn(_config(model_dir, True, 2, "learner.fsdp_param_dtype=bfloat16"), model_dir,
                  batch_file, tmp_path)[0]
    assert bf16["metrics"]["learner/loss"] == pytest.approx(one["metrics"]["learner/loss"],
                                                            abs=2e-2)
    for k, v in one["state"].items():  # the sharded master weights stay float32
        assert bf16["state"][k].dtype == torch.float32
        torch.testing.assert_close(bf16["state"][k], v, atol=2e-2, rtol=0)
