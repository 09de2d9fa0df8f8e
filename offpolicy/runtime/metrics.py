"""Run folder writers: metrics.jsonl (one line per learner step), summary.json, progress lines.

Reads: metric dicts from the learner. Writes: `runs/<name>/metrics.jsonl`, `summary.json`,
a progress line on stdout every `log.progress_every_s` seconds, and optionally the same
scalars to TensorBoard (`log.tensorboard`) and Weights & Biases (`log.wandb`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from offpolicy.config.schema import to_dict


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


class TensorBoardBackend:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    def __init__(self, run_dir: Path, cfg):
        import wandb

        self.run = wandb.init(project=cfg.log.wandb_project, name=run_dir.name,
                              dir=str(run_dir), mode=cfg.log.wandb_mode, config=to_dict(cfg))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def make_backends(cfg, run_dir: Path) -> list:
    """The logging backends `log.*` asks for, beside metrics.jsonl (always written)."""
    return ([TensorBoardBackend(run_dir)] if cfg.log.tensorboard else []) + (
        [WandbBackend(run_dir, cfg)] if cfg.log.wandb else [])


class MetricsWriter:
    def __init__(self, run_dir: Path, total_steps: int, progress_every_s: float = 2.0, out=None,
                 backends: list = ()):
        self.backends = list(backends)
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a crash keeps every line
        self.total, self.every = total_steps, progress_every_s
        self.out = out or sys.stdout
        self.last_print = 0.0
        self.last_eval = None

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")
        if self.backends:  # scalars only: histograms (dicts) stay in metrics.jsonl
            scalars = {k: float(v) for k, v in metrics.items() if k != "step"
                       and isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v)}
            for b in self.backends:
                b.log(scalars, metrics["step"])
        if "eval/reward" in metrics:
            self.last_eval = metrics["eval/reward"]
        now = time.monotonic()
        if now - self.last_print >= self.every or metrics["step"] == self.total:
            self.last_print = now
            self.out.write(progress_line(metrics, self.total, self.last_eval) + "\n")
            self.out.flush()

    def close(self) -> None:
        self.file.close()
        for b in self.backends:
            b.close()


def progress_line(m: dict, total: int, last_eval: float | None) -> str:
    ev = f"{last_eval:.2f}" if last_eval is not None else "  - "
    entropy = f"entropy {m['learner/entropy']:.2f} | " if "learner/entropy" in m else ""
    return (f"step {m['step']:>4}/{total} | reward {m['rollout/reward_mean']:.2f} | eval {ev} | "
            f"{entropy}staleness {m['staleness/mean']:.1f} (max {m['staleness/max']:.0f}) | "
            f"IS ratio {m['is/ratio_mean']:.3f} | "
            f"{rate(m['throughput/samples_per_s'])} samples/s | {m['time/elapsed_s']:.0f}s")


def rate(x: float) -> str:
    """A throughput with one decimal below 10 (a real model trains at 1.3/s, not "1")."""
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(
        json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n")
