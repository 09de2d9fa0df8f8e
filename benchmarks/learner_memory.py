"""Learner memory and step time per worker: 1 and 2 workers, without and with FSDP.

A model of SmolLM2-135M's shape (30 Llama blocks, hidden 576, vocabulary 49152, tied
embeddings: 134.5M parameters, random weights, built once in a temporary folder) trains
`--steps` learner steps (after one warm-up step) on the same synthetic batch (`--rows` rows of
`--prompt` + `--completion` random tokens) in each layout, side by side in one run:

- `1 worker`:          one Learner, the whole model, its gradients and AdamW state;
- `2 workers`:         data-parallel without sharding: each worker holds all of it;
- `2 workers + fsdp`:  learner.sharding=fsdp: each worker holds half of it.

Each layout runs in its own processes (gloo on CPU, one torch thread per worker, so on 2 cores
two workers run side by side; NCCL with `--device cuda`, where one GPU allows one worker, so the
layouts are `1 worker` and `1 worker + fsdp` in bf16). Per worker it prints the bytes held in
parameters, gradients and optimizer state (summed over the tensors' storages: exact), the
process's peak RSS (or the GPU's peak allocation), the step time and trained tokens/s, the
largest tensor a weight publish gathered (FSDP), and the ratios against `1 worker`.

Peak RSS includes loading: every worker reads the full weights into host memory before
sharding them (4 bytes per parameter), so RSS shrinks less than the tensors do.

Run: python benchmarks/learner_memory.py [--steps 3] [--rows 8] [--device cpu|cuda]
     (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offpolicy.buffer.fixed import FixedBatch  # noqa: E402
from offpolicy.runtime.validate import load_config  # noqa: E402
from offpolicy.learner import sharding  # noqa: E402
from offpolicy.learner.learner import Learner  # noqa: E402
from offpolicy.models.tiny import char_tokenizer  # noqa: E402
from offpolicy.core.types import Batch, Trajectory  # noqa: E402
from offpolicy.weights.sync import LocalSync  # noqa: E402


def build_model(folder: Path) -> None:
    """Random weights in SmolLM2-135M's shape, with the tiny model's tokenizer (the batch's
    token ids are drawn at random anyway)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, rope_theta=100000.0,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def synthetic_batch(rows: int, prompt: int, completion: int) -> Batch:
    rng = np.random.default_rng(0)
    trajs = [Trajectory(
        id=f"t{i}", group_id=f"g{i // 4}",
        prompt_ids=rng.integers(4, 49152, prompt).astype(np.int32),
        completion_ids=rng.integers(4, 49152, completion).astype(np.int32),
        loss_mask=np.ones(completion, np.int8),
        behavior_logprobs=np.full(completion, -10.0, np.float32),
        versions=np.zeros(completion, np.int32), reward=float(i % 2), env="synthetic",
        finish_reason="length") for i in range(rows)]
    return Batch(trajs, 0)


def worker(rank: int, world: int, layout: dict, args, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo",
                            init_method=f"file://{out}/rendezvous-{layout['name']}",
                            rank=rank, world_size=world)
    try:
        cfg = load_config(None, [f"model.path={folder}", "loss.name=tis",
                                 "engine.logprob_check_every=0",
                                 f"resources.learner_workers={world}",
                                 f"resources.learner_gpus={1 if cuda else 0}",
                                 f"learner.sharding={layout['sharding']}",
                                 f"learner.micro_batch={args.micro_batch}"])
        batch = synthetic_batch(args.rows, args.prompt, args.completion)
        learner = Learner(cfg, folder, FixedBatch(batch if rank == 0 else None), LocalSync())
        times, tokens = [], 0
        for step in range(args.steps + 1):
            start = time.perf_counter()
            metrics = learner.step()
            if cuda:
                torch.cuda.synchronize()
            if step:  # the first step warms up (allocations, first collectives)
                times.append(time.perf_counter() - start)
                tokens = metrics["learner/tokens"]
        result = {**sharding.storage_bytes(learner.model, learner.opt),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else 0.0,
                  "step_s": statistics.median(times), "tokens": tokens,
                  "gather_peak_mb": getattr(learner.parallel, "gather_peak_bytes", 0) / 2 ** 20,
                  "loss": metrics["learner/loss"]}
        Path(f"{out}/{layout['name']}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=96)
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        layouts = [{"name": "1 worker", "world": 1, "sharding": "none"},
                   {"name": "1 worker + fsdp", "world": 1, "sharding": "fsdp"}]
    else:
        layouts = [{"name": "1 worker", "world": 1, "sharding": "none"},
                   {"name": "2 workers", "world": 2, "sharding": "none"},
                   {"name": "2 workers + fsdp", "world": 2, "sharding": "fsdp"}]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    print(f"learner memory: SmolLM2-135M's shape, random weights; {args.rows} rows x "
          f"({args.prompt} + {args.completion}) tokens, {args.steps} timed steps; "
          f"{args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else cpu}, "
          f"{os.cpu_count()} cores), torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="learner-memory-") as tmp:
        folder = Path(tmp) / "model"
        build_model(folder)
        results = {}
        for layout in layouts:
            mp.spawn(worker, args=(layout["world"], layout, args, str(folder), tmp),
                     nprocs=layout["world"])
            results[layout["name"]] = [json.loads((Path(tmp) / f"{layout['name']}-rank{r}.json")
                                                  .read_text()) for r in range(layout["world"])]
    report(results)


def report(results: dict[str, list[dict]]) -> None:
    mb = 2 ** 20
    base = results["1 worker"][0]
    print(f"\n| layout | worker | params MB | grads MB | AdamW MB | params+grads+AdamW vs 1 "
          f"worker | peak RSS MB | GPU peak MB | step s | tokens/s | gather peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    held = lambda r: r["params"] + r["grads"] + r["optimizer"]  # noqa: E731
    for name, ranks in results.items():
        for rank, r in enumerate(ranks):
            print(f"| {name} | {rank} | {r['params'] / mb:.0f} | {r['grads'] / mb:.0f} | "
                  f"{r['optimizer'] / mb:.0f} | {held(r) / held(base):.2f}x | {r['rss_mb']:.0f} | "
                  f"{r['gpu_peak_mb']:.0f} | {r['step_s']:.2f} | "
                  f"{r['tokens'] / r['step_s']:.0f} | "
                  f"{r['gather_peak_mb']:.1f} |")
    for name, ranks in results.items():
        if name == "1 worker":
            continue
        worst = max(ranks, key=held)
        print(f"{name}: per worker, parameters {worst['params'] / base['params']:.2f}x, "
              f"AdamW state {worst['optimizer'] / base['optimizer']:.2f}x, all three "
              f"{held(worst) / held(base):.2f}x, peak RSS "
              f"{max(r['rss_mb'] for r in ranks) / base['rss_mb']:.2f}x, step time "
              f"{max(r['step_s'] for r in ranks) / base['step_s']:.2f}x of 1 worker's "
              f"(loss {ranks[0]['loss']:.6f} vs {base['loss']:.6f})")
        plain = results.get(name.removesuffix(" + fsdp"))
        if plain is not None and plain is not ranks:
            print(f"{name} vs {name.removesuffix(' + fsdp')}: per worker, all three "
                  f"{held(worst) / max(held(r) for r in plain):.2f}x, peak RSS "
                  f"{max(r['rss_mb'] for r in ranks) / max(r['rss_mb'] for r in plain):.2f}x, "
                  f"step time {max(r['step_s'] for r in ranks) / max(r['step_s'] for r in plain):.2f}x")


if __name__ == "__main__":
    main()
