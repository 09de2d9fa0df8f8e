"""Logging backends beside metrics.jsonl: TensorBoard events, W&B offline (or a clear error)."""

import importlib.util
import json

import pytest

from offpolicy.core.errors import ConfigError
from offpolicy.runtime.validate import load_config
from offpolicy.runtime.metrics import MetricsWriter, TensorBoardBackend


def metrics(step):
    return {"step": step, "rollout/reward_mean": 0.1 * step, "staleness/mean": 1.0,
            "staleness/max": 2, "staleness/hist": {"1": 3}, "is/ratio_mean": 1.0,
            "throughput/samples_per_s": 10.0, "time/elapsed_s": 1.0, "flag": True}


def test_tensorboard_gets_every_scalar_and_jsonl_everything(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, 3, out=open(tmp_path / "progress.txt", "w"),
                           backends=[TensorBoardBackend(tmp_path)])
    for step in (1, 2, 3):
        writer.write(metrics(step))
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "staleness/hist" not in acc.Tags()["scalars"] and "flag" not in acc.Tags()["scalars"]
    rewards = [(e.step, round(e.value, 5)) for e in acc.Scalars("rollout/reward_mean")]
    assert rewards == [(1, 0.1), (2, 0.2), (3, 0.3)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[2]["staleness/hist"] == {"1": 3}


def test_wandb_offline_or_a_one_line_error(tmp_path):
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="log.wandb: the `wandb` package is not installed"):
            load_config(None, ["log.wandb=true"])
        return
    from offpolicy.runtime.metrics import WandbBackend

    cfg = load_config(None, ["log.wandb=true", "log.wandb_mode=offline"])
    backend = WandbBackend(tmp_path, cfg)
    backend.log({"rollout/reward_mean": 0.5}, 1)
    backend.close()
    assert any((tmp_path / "wandb").iterdir())


def test_the_start_up_clock_starts_with_the_command_not_an_execing_shell():
    """A shell that sleeps, then execs Python (its process, started before the sleep, becomes
    Python's): the start-up breakdown's clock starts at most about a second before offpolicy
    was imported, not at the shell's start."""
    import subprocess
    import sys

    code = ("import time; from offpolicy.core.machine import process_started_at; "
            "print(time.time() - process_started_at())")
    execed = subprocess.run(["bash", "-c", f"sleep 3; exec {sys.executable} -c '{code}'"],
                            capture_output=True, text=True, check=True)
    direct = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert 0 <= float(execed.stdout) < 2.5  # without the clamp: over 3 s
    assert 0 <= float(direct.stdout) < 2.5


KEPT_CODE = """
import resource, sys
import torch
from offpolicy.core.machine import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported"); sys.exit()
torch.ones(16 << 20).sum()  # 64 MiB of float32, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(15 << 20).sum()  # 60 MiB: fits in the freed block (an aligned 64 MiB need not)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_reuses_a_freed_big_block_without_page_faults():
    """`resources.keep_freed_memory`: a 60 MiB tensor allocated after a 64 MiB one was freed
    takes that memory from the heap, without faulting its 15K pages in afresh (as a new
    mapping of its own does by default)."""
    import subprocess
    import sys

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", KEPT_CODE, mode], capture_output=True,
                             text=True, check=True).stdout.strip()
        if out == "unsupported":
            pytest.skip("not Linux with glibc")
        return int(out)

    assert faults("default") > 10_000
    assert faults("keep") < 1_000
