"""`offpolicy train`: one run from a config (or a resumed run), its exit code and last line.

Reads: a config file and `key=value` overrides, or a run folder to resume. Writes: the run
folder (through `runtime.launch.train`) and one line on stdout or stderr. Exit codes: 0 done,
1 a role failed (the message says how to resume), 2 bad input (one line naming the problem),
130 interrupted. The command line (`cli.py`) and an ablation's cells (`ablate_cells.py`) both
run it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from offpolicy.config.plan import RunPlan
from offpolicy.core.errors import ConfigError
from offpolicy.runtime.checkpoint import latest
from offpolicy.runtime.launch import train
from offpolicy.runtime.metrics import rate
from offpolicy.runtime.validate import load_config


def run_train(config: str | None, overrides: list[str], resume: str | None = None) -> int:
    """Train with `config` and `overrides`, or continue the run folder `resume` (then every
    argument is a `key=value` override); returns the exit code."""
    try:
        checkpoint = None
        if resume:
            cfg, checkpoint = resume_config(Path(resume), ([config] if config else [])
                                            + list(overrides))
        elif config is None:
            raise ConfigError("train: give a CONFIG file, or --resume RUN_DIR")
        else:
            cfg = load_config(config, overrides)
        summary = train(cfg, resume=checkpoint)
    except ConfigError as e:
        print(f"offpolicy: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a role failed; the message says how to resume
        print(f"offpolicy: {e}", file=sys.stderr)
        return 1
    if summary.get("interrupted"):
        print(f"interrupted; partial run in {summary['run_dir']}")
        return 130
    base = summary.get("base_eval_reward")
    first = summary["startup_s"].get("first step")  # none when a resume had no step left
    at = f" (first learner step at {first:.0f}s)" if first is not None else ""
    print(f"done in {summary['wall_s']:.0f}s{at}: eval reward "
          f"{'-' if base is None else f'{base:.3f}'} -> "
          f"{summary['final_eval_reward']:.3f}, {rate(summary['samples_per_s'])} samples/s, "
          f"staleness mean {summary['staleness_mean']:.2f} max {summary['staleness_max']:.0f}; "
          f"{summary['run_dir']}")
    return 0


def resume_config(run_dir: Path, overrides: list[str]):
    """(config, (checkpoint, driver state)) for `train --resume RUN_DIR [key=value ...]`."""
    checkpoint = latest(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides + [f"run.dir={run_dir}"])
    if RunPlan.of(cfg).lag is not None:
        raise ConfigError("--resume: lag-mode runs keep no checkpoints; rerun them (offpolicy "
                          "ablate reruns unfinished cells)")
    if cfg.learner.sharding == "fsdp" and not (checkpoint[0] / "optimizer").is_dir():
        raise ConfigError(f"--resume: {checkpoint[0]} was written without sharding; resume it "
                          "with learner.sharding=none (a sharded one resumes either way)")
    if checkpoint[1]["step"] >= cfg.learner.steps:
        raise ConfigError(f"--resume: the checkpoint is at step {checkpoint[1]['step']} and the "
                          f"run has {cfg.learner.steps} steps; raise learner.steps to go on")
    return cfg, checkpoint
