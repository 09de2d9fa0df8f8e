"""The learner step with and without `learner.share_prompts`, on SmolLM2-135M-Instruct.

The batch is configs/smollm2_cpu.yaml's shape: `--groups` chat prompts of the
`multiplication` task (SmolLM2's template: about 45 tokens with its default system prompt) x
`--group-size` completions of 2-16 random tokens each. One Learner per setting (the config's
KL term, so a reference forward too) takes `--steps` steps on that same batch after one
warm-up step, the two settings alternating step by step so that a drift in the machine's
speed hits both alike. Printed: tokens the forward passes run over, the median step time of
each and its ratio, and the largest difference in the step's log-probs and loss.

Run: python benchmarks/shared_prompt.py [--steps 4] [--groups 2] [--group-size 8]
     (about 3 minutes on 2 cores; converts the GGUF file once if the cache lacks it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offpolicy.buffer.fixed import FixedBatch  # noqa: E402
from offpolicy.models.chat import messages_of, prompt_ids  # noqa: E402
from offpolicy.runtime.validate import load_config  # noqa: E402
from offpolicy.envs import env_from_config  # noqa: E402
from offpolicy.learner.learner import Learner  # noqa: E402
from offpolicy.models.loading import cache_root, load_tokenizer  # noqa: E402
from offpolicy.models.sources import resolve_model_path  # noqa: E402
from offpolicy.config.plan import RunPlan  # noqa: E402
from offpolicy.core.process import setup_process  # noqa: E402
from offpolicy.core.types import Batch, Trajectory  # noqa: E402
from offpolicy.weights.sync import LocalSync  # noqa: E402


def make_batch(cfg, tokenizer, groups: int, size: int, seed: int = 0) -> Batch:
    env, rng = env_from_config(cfg.env, "train"), np.random.default_rng(seed)
    trajs = []
    for g in range(groups):
        text = env.reset(g)
        prompt = np.array(prompt_ids(tokenizer, text, messages_of(text, cfg.env.system_prompt,
                                                                  cfg.env.chat)), np.int32)
        for i in range(size):
            T = int(rng.integers(2, 17))
            trajs.append(Trajectory(f"{g}-{i}", str(g), prompt,
                                    rng.integers(100, 40000, T).astype(np.int32),
                                    np.ones(T, np.int8), np.full(T, -2.0, np.float32),
                                    np.zeros(T, np.int32), float(rng.integers(0, 2)),
                                    "multiplication", "stop"))
    return Batch(trajs, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "smollm2_cpu.yaml",
                      ["engine.logprob_check_every=0", f"rollout.group_size={args.group_size}",
                       "model.lora.r=0", "learner.precision=fp32"])  # as measured (docs)
    setup_process(RunPlan.of(cfg).learner_threads)  # as a learner process is set up
    folder = resolve_model_path(cfg, cache_root(cfg))
    tokenizer = load_tokenizer(folder)
    batch = make_batch(cfg, tokenizer, args.groups, args.group_size)
    d = batch.padded(tokenizer.pad_token_id)
    prompt_tokens = sum(len(t.prompt_ids) for t in batch.trajectories[::args.group_size])
    completion_tokens = sum(len(t.completion_ids) for t in batch.trajectories)
    print(f"CPU: {_cpu()}, learner {cfg.resources.torch_threads} torch thread(s); batch {len(batch)} rows, prompts "
          f"{len(batch.trajectories[0].prompt_ids)} tokens, completions {completion_tokens} "
          "tokens in all")
    print(f"tokens a forward runs over: plain (padded) {d.input_ids.size}, shared "
          f"{prompt_tokens + completion_tokens} (+ completion padding)")
    learners, times, results = {}, {"plain": [], "shared": []}, {}
    for name, share in (("plain", "false"), ("shared", "true")):
        c = load_config(ROOT / "configs" / "smollm2_cpu.yaml",
                        ["engine.logprob_check_every=0", f"learner.share_prompts={share}",
                         "model.lora.r=0", "learner.precision=fp32"])
        learners[name] = Learner(c, str(folder), FixedBatch(batch), LocalSync())
        learners[name].step()  # warm-up
    for _ in range(args.steps):
        for name, learner in learners.items():
            t = time.perf_counter()
            results[name] = learner.step()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in times:
        print(f"{name:>6}: step {med[name]:.2f} s (median of {args.steps}: "
              f"{', '.join(f'{t:.2f}' for t in times[name])}), loss "
              f"{results[name]['learner/loss']:.6f}, kl {results[name]['kl/ref']:.6f}; "
              + ", ".join(f"{k.split('/')[-1]} {v:.2f} s" for k, v in results[name].items()
                          if k.startswith("time/")))
    print(f"shared / plain step time: {med['shared'] / med['plain']:.2f}x "
          f"(speed-up {med['plain'] / med['shared']:.2f}x)")
    diff = max((a - b).abs().max().item() for a, b in
               zip(learners["plain"].model.parameters(), learners["shared"].model.parameters()))
    print(f"largest parameter difference after {args.steps + 1} steps: {diff:.2e}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
