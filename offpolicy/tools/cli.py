"""Command line: `offpolicy train CONFIG [key=value ...]`, `offpolicy ablate CONFIG [key=value]`,
`offpolicy report RUN_DIR`, `offpolicy config-reference`.

Reads: argv. Writes: a run folder (train), or the config reference as markdown (stdout).
Bad input exits 2 with one line on stderr naming the problem, never a traceback. Each command
imports what it needs when it runs, so `--help` and `config-reference` start at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading

from offpolicy.config.io import reference_rows
from offpolicy.core.errors import ConfigError
from offpolicy.core.process import setup_process


def main(argv: list[str] | None = None) -> int:
    setup_process()  # this process's environment, before any model library is imported
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
    from offpolicy.tools.ablate import ablate

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
    from offpolicy.tools.report import report

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
    """The trainer's imports (torch, transformers: 2.8 s) on a thread while a private Ray, if
    the config asks for one, starts here (`start_ray_early`)."""
    from offpolicy.runtime.placement import start_ray_early, stop_early_ray

    importer = threading.Thread(target=_import_quietly, args=("offpolicy.tools.train_command",),
                                daemon=True)
    importer.start()
    try:
        early = args.resume is None and start_ray_early(args.config, args.overrides)
    finally:
        importer.join()
    from offpolicy.tools.train_command import run_train

    try:
        return run_train(args.config, args.overrides, args.resume)
    finally:
        if early:
            stop_early_ray()


def _import_quietly(module: str) -> None:
    """Import `module` ahead of its use; a failure is left for that use to raise and report."""
    try:
        importlib.import_module(module)
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
