"""Is the tiny base model's build robust? Build it for several `model.tiny.seed`s from an empty
cache and print, per seed, the supervised steps, the build time, the probe accuracy the build
stopped at and the greedy eval on the 200 held-out problems (the base eval every run starts
from). Every seed must land inside model.tiny.base_accuracy; a build that cannot is an error.

    python benchmarks/base_build.py [--seeds 0 1 2 3 4] [key=value ...]

Reads: configs/quickstart.yaml (+ overrides). Writes: a temporary cache, deleted at the end.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from offpolicy.runtime.validate import load_config
from offpolicy.core.process import environment_info
from offpolicy.models.loading import load_policy
from offpolicy.models.sources import ensure_base_model
from offpolicy.models.tiny import BuildError, build_info, evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for seed in args.seeds:
            cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                              [*args.overrides, f"model.tiny.seed={seed}",
                               f"model.cache_dir={cache}"])
            try:
                path = ensure_base_model(cfg, log=lambda *a: None)
            except BuildError as e:
                rows.append((seed, "-", "-", "-", f"FAILED: {e}"))
                continue
            info = build_info(path)
            model, tok = load_policy(path)
            base = evaluate(model, tok, cfg.env, list(range(cfg.env.eval_size)),
                            cfg.engine.max_new_tokens)
            rows.append((seed, info["sft_steps"], f"{info['build_s']:.1f}",
                         f"{info['probe_accuracy']:.3f}", f"{base:.3f}"))
    machine = environment_info()
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores); torch {machine['torch']}")
    print("| model.tiny.seed | supervised steps | build (s) | probe accuracy | base eval |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
