"""Command line: `offpolicy train CONFIG [key=value ...]`, `offpolicy ablate CONFIG [key=value]`,
`offpolicy report RUN_DIR`, `offpolicy config-reference`.

Reads: argv. Writes: a run folder (train), or the config reference as markdown (stdout).
Bad input exits 2 with one line on stderr naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from offpolicy.config import ConfigError
from offpolicy.config_io import load_config, reference_rows
from offpolicy.metrics import rate


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"train": _train, "ablate": _ablate, "report": _report,
               "config-reference": _config_reference}[args.command]
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offpolicy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train with a config (YAML) and key=value overrides")
    p_train.add_argument("config", nargs="?", help="YAML file of overrides of the defaults")
    p_train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p_train.add_argument("--resume", metavar="RUN_DIR",
                         help="continue this run from its newest checkpoint (no CONFIG: the run's "
                              "own config.yaml, with any key=value overrides)")
    p_ablate = sub.add_parser("ablate", help="one run per cell of the config's `ablate.grid`, "
                              "then results.csv, results.md and plots")
    p_ablate.add_argument("config", help="YAML with an `ablate:` section (configs/ablation.yaml)")
    p_ablate.add_argument("overrides", nargs="*", help="key.sub=value overrides for every cell")
    p_report = sub.add_parser("report", help="plots and a markdown summary of one run folder")
    p_report.add_argument("run_dir")
    sub.add_parser("config-reference", help="print every config key with default and doc")
    return parser


def _ablate(args) -> int:
    from offpolicy.ablate import ablate

    try:
        ablate(args.config, args.overrides, log=lambda m: print(m, flush=True))
    except ConfigError as e:
        print(f"offpolicy: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"offpolicy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume (finished cells are kept)")
        return 130
    return 0


def _report(args) -> int:
    from offpolicy.report import report

    try:
        print(f"wrote {report(args.run_dir)} and report.png")
    except FileNotFoundError as e:
        print(f"offpolicy: error: {e}", file=sys.stderr)
        return 2
    return 0


def _config_reference(args) -> int:
    print("| key | default | meaning |\n|---|---|---|")
    for key, default, doc in reference_rows():
        print(f"| `{key}` | `{default}` | {doc} |")
    return 0


def _train(args) -> int:
    try:
        resume = None
        if args.resume:
            cfg, resume = _resume_config(args)
        elif args.config is None:
            raise ConfigError("train: give a CONFIG file, or --resume RUN_DIR")
        else:
            cfg = load_config(args.config, args.overrides)
        from offpolicy.launch import train

        summary = train(cfg, resume=resume)
    except ConfigError as e:
        print(f"offpolicy: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a role failed; the message says how to resume
        print(f"offpolicy: {e}", file=sys.stderr)
        return 1
    if summary.get("interrupted"):
        print(f"interrupted; partial run in {summary['run_dir']}")
        return 130
    print(f"done in {summary['wall_s']:.0f}s: eval reward {summary['base_eval_reward']:.3f} -> "
          f"{summary['final_eval_reward']:.3f}, {rate(summary['samples_per_s'])} samples/s, "
          f"staleness mean {summary['staleness_mean']:.2f} max {summary['staleness_max']:.0f}; "
          f"{summary['run_dir']}")
    return 0


def _resume_config(args):
    """(config, (checkpoint, driver state)) for `train --resume RUN_DIR [key=value ...]`."""
    from pathlib import Path

    from offpolicy.checkpoint import latest

    overrides = ([args.config] if args.config else []) + args.overrides  # all key=value here
    run_dir = Path(args.resume)
    checkpoint = latest(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides + [f"run.dir={run_dir}"])
    if cfg.staleness.mode == "lag":
        raise ConfigError("--resume: lag-mode runs keep no checkpoints; rerun them (offpolicy "
                          "ablate reruns unfinished cells)")
    if cfg.learner.sharding == "fsdp" and not (checkpoint[0] / "optimizer").is_dir():
        raise ConfigError(f"--resume: {checkpoint[0]} was written without sharding; resume it "
                          "with learner.sharding=none (a sharded one resumes either way)")
    if checkpoint[1]["step"] >= cfg.learner.steps:
        raise ConfigError(f"--resume: the checkpoint is at step {checkpoint[1]['step']} and the "
                          f"run has {cfg.learner.steps} steps; raise learner.steps to go on")
    return cfg, checkpoint


if __name__ == "__main__":
    sys.exit(main())
