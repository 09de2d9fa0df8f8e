"""Command line: `offpolicy train CONFIG [key=value ...]`, `offpolicy config-reference`.

Reads: argv. Writes: a run folder (train), or the config reference as markdown (stdout).
Bad input exits 2 with one line on stderr naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from offpolicy.config import ConfigError, load_config, reference_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offpolicy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train with a config (YAML) and key=value overrides")
    p_train.add_argument("config", help="YAML file of overrides of the defaults")
    p_train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    sub.add_parser("config-reference", help="print every config key with default and doc")
    args = parser.parse_args(argv)

    if args.command == "config-reference":
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, doc in reference_rows():
            print(f"| `{key}` | `{default}` | {doc} |")
        return 0

    try:
        cfg = load_config(args.config, args.overrides)
        from offpolicy.launch import train

        summary = train(cfg)
    except ConfigError as e:
        print(f"offpolicy: error: {e}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        print(f"interrupted; partial run in {summary['run_dir']}")
        return 130
    print(f"done in {summary['wall_s']:.0f}s: eval reward {summary['base_eval_reward']:.3f} -> "
          f"{summary['final_eval_reward']:.3f}, {summary['samples_per_s']:.0f} samples/s, "
          f"staleness mean {summary['staleness_mean']:.2f} max {summary['staleness_max']:.0f}; "
          f"{summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
