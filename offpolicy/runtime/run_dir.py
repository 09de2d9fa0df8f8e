"""The run folder: created once per run, never mixed with another run's files.

Reads: `run.dir`, `run.name`, `run.overwrite`, `engine.weights_dir`.
Writes: `<run dir>/config.yaml` (the resolved config); on resume, cuts `metrics.jsonl` back to
the checkpoint's step. `launch.py` writes the rest (metrics, summary, checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from offpolicy.config.schema import Config, to_dict
from offpolicy.core.errors import ConfigError


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run folder; never silently mixes two runs' files."""
    if cfg.run.dir:
        run_dir = Path(cfg.run.dir)
        if (run_dir / "config.yaml").exists():
            if not cfg.run.overwrite:
                raise ConfigError(f"run.dir: {run_dir} already holds a run; choose another "
                                  "folder or set run.overwrite=true")
            for name in ("metrics.jsonl", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
    else:
        base = runs_root() / cfg.run.name
        run_dir, n = base, 2
        while (run_dir / "config.yaml").exists():
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
        cfg.run.dir = str(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, run_dir)
    except OSError as e:
        raise ConfigError(f"run.dir: cannot create or write {run_dir}: "
                          f"{e.strerror or type(e).__name__}") from None
    return run_dir


def write_config(cfg: Config, run_dir: Path) -> None:
    """The resolved config as `<run dir>/config.yaml`."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def runs_root() -> Path:
    """`runs/` in the working directory; ~/runs when that directory is the temporary copy
    `ray job submit --working-dir` made (Ray deletes it after the job)."""
    if "working_dir_files" in Path.cwd().parts[-2:-1]:
        return Path.home() / "runs"
    return Path("runs")


def reopen_run_dir(cfg: Config, step: int) -> Path:
    """A resumed run's folder: config.yaml rewritten (with any new overrides), metrics.jsonl
    cut back to the checkpoint's step (the lines after it belong to the lost stretch)."""
    run_dir = Path(cfg.run.dir)
    write_config(cfg, run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        keep = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        metrics.write_text("".join(line + "\n" for line in keep))
    return run_dir


def weights_dir(cfg: Config) -> Path:
    """Where FileSync writes: engine.weights_dir, else <run dir>/weights (removed at the end)."""
    if cfg.engine.weights_dir:
        return Path(cfg.engine.weights_dir).expanduser().resolve() / Path(cfg.run.dir).name
    return Path(cfg.run.dir).resolve() / "weights"
