"""The whole loop on a local Ray instance: the quickstart's model and task, a few steps.

Also Ctrl-C: an interrupted `offpolicy train` exits cleanly and leaves no Ray process behind.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offpolicy.runtime.validate import load_config
from offpolicy.runtime.launch import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_ray_loop_versions_staleness_and_parameters(base_model, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(QUICKSTART, [
        f"model.path={base_model}", f"run.dir={run_dir}", "learner.steps=8",
        "learner.batch_groups=4", "rollout.prompts_per_batch=8", "buffer.max_staleness=2",
        "buffer.drop_uniform_groups=false", "eval.every=4", "env.eval_size=32"])
    summary = train(cfg, log=lambda *a: None)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 9))      # versions 1..8, in order
    assert all(0 <= m["staleness/min"] <= m["staleness/max"] <= 2 for m in metrics)
    # evals run on actor 0 while the learner goes on: a row carries the version it measured
    evals = [(m["step"], m["eval/version"]) for m in metrics if "eval/reward" in m]
    assert evals[-1] == (8, 8) and all(v <= step for step, v in evals)
    assert all(4 <= v for _, v in evals)  # nothing before the first request (step 4)
    assert summary["steps"] == 8 and summary["samples"] == 8 * 4 * 8
    assert summary["ledger"]["balanced"] and summary["ledger"]["retired"] == 8 * 4 * 8
    assert not summary["interrupted"]
    base = load_file(str(base_model / "model.safetensors"))
    final = load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))
    assert any(not torch.equal(base[k], final[k]) for k in base)
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in run_dir.iterdir()}


def ray_processes() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()
            if any(k in line for k in ("raylet", "gcs_server", "ray::", "ray/_private"))}


def sigint_default() -> None:
    """In the child before exec: Ctrl-C's default action, whatever this process inherited. A
    shell starts background jobs with SIGINT ignored, and Python would keep it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.ray
def test_ctrl_c_stops_cleanly(base_model, tmp_path):
    before = ray_processes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "offpolicy.tools.cli", "train", str(QUICKSTART), f"model.path={base_model}",
         f"run.dir={tmp_path / 'run'}", "learner.steps=100000", "log.progress_every_s=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        preexec_fn=sigint_default)
    for line in proc.stdout:  # wait until training is really under way
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    deadline = time.monotonic() + 30  # Ray's own processes exit asynchronously after shutdown
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] is True


@pytest.mark.ray
def test_a_stalled_learner_says_what_it_waits_for(base_model, tmp_path):
    """Random tokens never answer right, so every group is uniform and dropped (no filter
    floor): the learner gets no batch. The run says so every log.stall_warn_s instead of
    sitting silent."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "offpolicy.tools.cli", "train", str(QUICKSTART), f"model.path={base_model}",
         f"run.dir={tmp_path / 'run'}", "engine.name=fake", "log.stall_warn_s=3",
         "buffer.filter_floor=0"],  # the quickstart's floor would keep the uniform groups
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        preexec_fn=sigint_default)
    seen = []
    try:
        for line in proc.stdout:
            if line.startswith("no learner step for"):
                seen.append(line)
                if len(seen) == 2:
                    break
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest
    assert "waiting for a batch of 16 groups; the buffer holds 0 groups; so far:" in seen[0]
    assert "since the last notice" in seen[1] and "of them dropped as uniform" in seen[1]
    assert "nearly every group scores all-equal rewards" in seen[1]
    counts = re.search(r"(\d+) episodes arrived, (\d+) of them", seen[1]).groups()
    arrived, dropped = map(int, counts)
    assert arrived > 0 and dropped == arrived  # random tokens never answer right
