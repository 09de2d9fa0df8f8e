"""Where `offpolicy ablate` runs a cell: a local process, or a Ray task on a cluster.

Reads: the ablation's base config and each cell's overrides. Writes: the cell's run folder in
the ablation folder (`train.log`, and the run's own files).

Both kinds are handles with `poll()` (the exit code once finished, else None), `stop()`
(SIGTERM to the cell's run, which stops its own roles) and `close()`.
- `LocalCell`: `offpolicy train` in its own session on this machine.
- `ForkedCell`: the same for a serial cell with the HF engine, forked from a server process
  that has already imported torch, transformers and offpolicy (`PRELOAD`). The imports take
  about 7 s per process here, 5 minutes of an 84-cell grid on two cores.
- `ClusterCell` (`cluster.address` set in the ablation's config): a Ray task that asks the
  cluster for the cell's resources (`cell_resources`), runs `offpolicy train` in a temporary
  folder on whichever node Ray picks, and returns the run's small files (`RETURNED`), which
  are written to the cell's folder here. The cell's final policy and checkpoints stay behind
  on that node and are deleted with the temporary folder: an ablation needs its numbers.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from offpolicy.runtime.placement import private_ray_auth
from offpolicy.tools.train_command import run_train

RETURNED = ("summary.json", "metrics.jsonl", "config.yaml", "train.log")
# What the fork server imports once for every ForkedCell: `offpolicy train` (the driver, the
# serial roles, the losses) and the tiny model's classes.
PRELOAD = ["offpolicy.tools.train_command", "offpolicy.runtime.serial_roles",
           "transformers.models.llama.modeling_llama", "transformers.tokenization_utils_fast"]


def cell_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """A cell's `offpolicy train` overrides: the cell's, then its run folder's."""
    return [*overrides, f"run.dir={run_dir}", "run.overwrite=true", "log.progress_every_s=30"]


def train_command(base_path: Path, overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "offpolicy.tools.cli", "train", str(base_path),
            *cell_overrides(overrides, run_dir)]


class LocalCell:
    def __init__(self, base_path: Path, overrides: list[str], run_dir: Path, env: dict):
        run_dir.mkdir(exist_ok=True)
        self.out = open(run_dir / "train.log", "w")
        self.proc = subprocess.Popen(train_command(base_path, overrides, run_dir),
                                     stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)

    def close(self) -> None:
        self.proc.wait(timeout=60)
        self.out.close()


def _forked_train(base_path: str, overrides: list[str], log_path: str, env: dict) -> None:
    """A ForkedCell's process: its own session (so `stop` reaches whatever it starts),
    stdout and stderr into the cell's train.log, the ablation's environment, then
    `offpolicy train`; its exit code is the command's."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    sys.exit(run_train(base_path, overrides))


@functools.cache
def _fork_server():
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload(PRELOAD)
    return server


class ForkedCell:
    """A LocalCell without the interpreter start and the imports (see the module doc)."""

    def __init__(self, base_path: Path, overrides: list[str], run_dir: Path, env: dict):
        run_dir.mkdir(exist_ok=True)
        self.proc = _fork_server().Process(
            target=_forked_train, daemon=False,
            args=(str(base_path), cell_overrides(overrides, run_dir),
                  str(run_dir / "train.log"), env))
        self.proc.start()

    def poll(self) -> int | None:
        return self.proc.exitcode

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # not yet in its own session
            self.proc.terminate()

    def close(self) -> None:
        self.proc.join(timeout=60)


def cell_resources(cfg) -> dict:
    """What a cell's task asks the cluster for. A serial cell runs every role in the task's
    process: the learner's CPUs, GPUs and custom resources. A cell with Ray roles places them
    itself (its placement group), so its driver task asks for nothing."""
    r = cfg.resources
    if r.serial:
        return {"num_cpus": max(r.learner_cpus, 1.0), "num_gpus": r.learner_gpus,
                "resources": dict(r.learner_resources)}
    return {"num_cpus": 0}


def _run_remote(base_text: str, overrides: list[str], name: str) -> dict:
    """The Ray task: `offpolicy train` in a temporary folder; returns the exit code, the node
    and the run's small files. Cancelling the task (KeyboardInterrupt here) stops the run."""
    import ray

    with tempfile.TemporaryDirectory(prefix="offpolicy-cell-") as tmp:
        base_path, run_dir = Path(tmp) / "base.yaml", Path(tmp) / name
        base_path.write_text(base_text)
        run_dir.mkdir()
        with open(run_dir / "train.log", "w") as out:
            proc = subprocess.Popen(train_command(base_path, overrides, run_dir), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
                raise
        files = {f: (run_dir / f).read_bytes() for f in RETURNED if (run_dir / f).exists()}
        return {"code": code, "node": ray.get_runtime_context().get_node_id(), "files": files}


class ClusterCell:
    def __init__(self, base_path: Path, overrides: list[str], run_dir: Path, resources: dict):
        import ray

        run_dir.mkdir(exist_ok=True)
        self.run_dir = run_dir
        task = ray.remote(max_retries=0)(_run_remote).options(**resources)
        self.ref = task.remote(base_path.read_text(), overrides, run_dir.name)
        (run_dir / "train.log").write_text(f"running on the Ray cluster with {resources}\n")
        self.code: int | None = None

    def poll(self) -> int | None:
        import ray

        if self.code is None and ray.wait([self.ref], timeout=0)[0]:
            try:
                result = ray.get(self.ref)
            except Exception as e:  # the task died (node lost, cancelled): a failed cell
                (self.run_dir / "train.log").write_text(f"the cell's Ray task failed: {e}\n")
                self.code = 1
            else:
                for name, data in result["files"].items():
                    (self.run_dir / name).write_bytes(data)
                with open(self.run_dir / "train.log", "a") as f:
                    f.write(f"\n(ran on Ray node {result['node']})\n")
                self.code = result["code"]
        return self.code

    def stop(self) -> None:
        import ray

        ray.cancel(self.ref)  # KeyboardInterrupt in the task, which stops its run

    def close(self) -> None:
        import ray

        ray.wait([self.ref], timeout=60)


def connect_cluster(address: str) -> None:
    """Join the cluster the cells run on (its daemons are someone else's: nothing to stop)."""
    import ray

    private_ray_auth()
    ray.init(address=address, logging_level="WARNING", configure_logging=True)
