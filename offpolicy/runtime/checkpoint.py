"""Resumable checkpoints: one folder per checkpoint, written whole or not at all.

Reads: a run folder's `checkpoints/`. Writes: `checkpoints/step-NNNNNN/` holding
`model/` (the policy as a Hugging Face folder), `learner.pt` (optimizer, version, random
state), `buffer.pkl` (the replay buffer's snapshot, with `checkpoint.buffer`) and
`driver.json` (the driver's step and running totals). With `learner.sharding=fsdp` the
optimizer state is in `optimizer/` instead (each worker's shard, torch.distributed.checkpoint;
any number of workers, sharded or not, can load it).

Atomic: the roles write into `step-NNNNNN.tmp/`, every file is flushed to disk, and one
rename makes it `step-NNNNNN/`. A crash mid-write leaves only a `.tmp` folder, which resume
ignores and the next checkpoint removes; a folder that is there is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from offpolicy.core.errors import ConfigError

REQUIRED = ("model/config.json", "model/model.safetensors", "learner.pt", "driver.json")


def staging(run_dir: Path, step: int) -> Path:
    """An empty `.tmp` folder for the checkpoint of `step` (a leftover one is removed)."""
    tmp = run_dir / "checkpoints" / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, driver_state: dict, keep: int) -> Path:
    """Write driver.json, flush everything, rename `tmp` to its final name; keep the newest
    `keep` checkpoints. Returns the checkpoint folder."""
    (tmp / "driver.json").write_text(json.dumps(driver_state))
    for path in tmp.rglob("*"):  # on disk before the rename makes the checkpoint visible
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest(run_dir: Path) -> tuple[Path, dict]:
    """The newest checkpoint of `run_dir` and its driver state, checked before any process
    starts: a missing or damaged one is a one-line ConfigError naming the file."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {run_dir} is not a run folder (no config.yaml)")
    found = checkpoints(run_dir)
    if not found:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from (they are "
                          "written every checkpoint.every steps)")
    ck = found[-1]
    missing = [f for f in REQUIRED if not (ck / f).is_file()]
    if missing:
        raise ConfigError(f"--resume: checkpoint {ck} is incomplete: no {', '.join(missing)}")
    try:
        state = json.loads((ck / "driver.json").read_text())
        step = int(state["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume: checkpoint {ck} is corrupt: driver.json ({e})") from None
    if not zipfile.is_zipfile(ck / "learner.pt"):  # torch.save writes a zip archive
        raise ConfigError(f"--resume: checkpoint {ck} is corrupt: learner.pt is not a torch "
                          "checkpoint")
    try:
        from safetensors import safe_open

        with safe_open(str(ck / "model" / "model.safetensors"), "pt") as f:
            f.keys()
    except Exception as e:
        raise ConfigError(f"--resume: checkpoint {ck} is corrupt: model.safetensors "
                          f"({str(e).splitlines()[0]})") from None
    if (ck / "optimizer").is_dir() and not (ck / "optimizer" / ".metadata").is_file():
        raise ConfigError(f"--resume: checkpoint {ck} is incomplete: no optimizer/.metadata "
                          "(its sharded optimizer state)")
    if step != int(ck.name.removeprefix("step-")):
        raise ConfigError(f"--resume: checkpoint {ck} is corrupt: driver.json says step {step}")
    return ck, state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
