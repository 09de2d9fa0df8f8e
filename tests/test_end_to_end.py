"""A short quickstart run on Ray must learn: held-out greedy reward rises."""

import json
from pathlib import Path

import pytest

from offpolicy.runtime.validate import load_config
from offpolicy.runtime.launch import train

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_short_quickstart_run_learns(tmp_path):
    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path / 'run'}", "learner.steps=200",
                                   "eval.every=100"])
    summary = train(cfg, log=print)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["final_eval_reward"] == summary["final_eval_reward"]
    assert 0.1 <= summary["base_eval_reward"] <= 0.5
    assert summary["final_eval_reward"] >= summary["base_eval_reward"] + 0.1
    build = saved["base_model_build"]  # the base model's recipe outcome and where it was built
    assert build["flawed_share"] == 0.7 and 0.1 <= build["probe_accuracy"] <= 0.5
    assert {"cpu", "torch", "transformers", "sft_steps", "build_s"} <= set(build)
    assert saved["machine"]["torch"] == build["torch"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(x) for x in lines]
    assert all(0 < m["learner/entropy"] < 4.6 for m in metrics)  # log(98 tokens) = 4.58


@pytest.mark.slow
def test_quickstart_learns_with_two_fsdp_workers(tmp_path):
    """The same run with the policy sharded over two FSDP learner workers (gloo)."""
    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path / 'run'}", "learner.steps=200",
                                   "eval.every=100", "resources.learner_workers=2",
                                   "resources.learner_cpus=0.5", "learner.sharding=fsdp"])
    summary = train(cfg, log=print)
    assert summary["final_eval_reward"] >= summary["base_eval_reward"] + 0.1
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # each publish gathered one parameter at a time: at most the largest one (the embedding)
    assert 0 < metrics[-1]["memory/fsdp_gather_peak_mb"] < 1
    assert (tmp_path / "run" / "checkpoints" / "final" / "model.safetensors").exists()
