"""Data-parallel learner workers (torch.distributed, gloo on CPU) against one worker."""

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from offpolicy.actors.rollout import RolloutActor
from offpolicy.learner.learner import Learner
from offpolicy.core.types import Batch
from offpolicy.weights.sync import LocalSync, cpu_state

from conftest import OneBatch, fast_config


def _train_one_step(cfg, model_dir, batch):
    learner = Learner(cfg, str(model_dir), OneBatch(batch), LocalSync())
    metrics = learner.step()
    return metrics, cpu_state(learner.model)


def _worker(rank, world, cfg, model_dir, batch_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous",
                            rank=rank, world_size=world)
    try:
        # only rank 0 reads the buffer: the others must get the batch from it
        batch = pickle.load(open(batch_file, "rb")) if rank == 0 else None
        metrics, state = _train_one_step(cfg, model_dir, batch)
        torch.save({"metrics": metrics, "state": state}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("micro", [0, 5])
def test_two_workers_match_one_on_the_same_batch(model_dir, tmp_path, micro):
    cfg = fast_config(model_dir, "loss.name=tis", f"learner.micro_batch={micro}",
                      "engine.logprob_check_every=0")
    actor = RolloutActor(cfg, 0, str(model_dir), None, LocalSync())
    groups = actor.rollout_batch()
    for g in groups:  # the random model never answers right: give each group some signal
        g[0].reward = 1.0
    batch = Batch([t for g in groups for t in g], 0)
    batch_file = tmp_path / "batch.pkl"
    batch_file.write_bytes(pickle.dumps(batch))

    one_metrics, one_state = _train_one_step(cfg, model_dir, batch)
    mp.spawn(_worker, args=(2, cfg, model_dir, str(batch_file), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    two = ranks[0]["metrics"]
    assert two["learner/loss"] == pytest.approx(one_metrics["learner/loss"], abs=1e-6)
    assert two["is/ratio_mean"] == pytest.approx(one_metrics["is/ratio_mean"], abs=1e-6)
    assert two["learner/tokens"] == one_metrics["learner/tokens"]
    for k, v in one_state.items():
        torch.testing.assert_close(ranks[0]["state"][k], v, atol=1e-6, rtol=1e-5)
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k])  # workers stay equal
    assert any(not torch.equal(v, cpu_state(actor.engine.model)[k]) for k, v in one_state.items())
