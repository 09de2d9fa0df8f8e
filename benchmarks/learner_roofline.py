"""The learner step's achieved FLOP/s on SmolLM2-135M, against this machine's matmul peak.

The batch is configs/smollm2_cpu.yaml's shape (the `shared_prompt.py` batch: `--groups` chat
prompts of the multiplication task x `--group-size` completions of 2-16 random tokens), and
the learner is that config's (KL term to the base model, so a reference forward too), one
Learner per setting: `fp32`, `bf16` (`learner.precision`), and the same two with
`model.lora` when peft is installed. Each setting's step is counted once under torch's
`FlopCounterMode` (the matmul and attention FLOPs it dispatches: forward, backward and the
reference), then `--steps` steps are timed, the settings alternating step by step so a drift
in the machine's speed hits all alike.

The peak is measured here too: the median of 5 runs of a 2048 x 2048 x 2048 matmul in float32
and in bfloat16, with the learner's thread count. One line per setting: step seconds (median),
GFLOP per step, achieved GFLOP/s, and the utilisation against the peak of its compute dtype
and against the bf16 peak. Then one line on AdamW's step for the first setting's parameters:
fused (what the learner uses), foreach and one tensor at a time.

The matmul floor: every matrix product of one step (the products FlopCounterMode counts, with
their shapes, strides and dtypes, as autocast hands them down) is replayed on warm random
tensors, each distinct call timed as the median of 5 and weighted by its count. Its sum is
the step if nothing but the products took time, so FLOPs / floor is the most a step of this
batch shape could reach with these kernels. The rest of the step (AdamW, casts, norms, the
vocabulary-wide log-probs, Python) is the step minus the floor; the same recorded step times
every other op as it runs (CPU ops are synchronous) and names the five that took the longest.
Both come from a step after the timed ones, its memory faulted in: torch's profiler would
fault in fresh pages of its own and misplace their cost on the ops.

Run: python benchmarks/learner_roofline.py [--steps 4] [--threads 1] [--only fp32,bf16]
     (about 5 minutes on 2 cores; converts the GGUF file once if the cache lacks it)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from shared_prompt import _cpu, make_batch  # noqa: E402

from offpolicy.buffer.fixed import FixedBatch  # noqa: E402
from offpolicy.core.process import setup_process  # noqa: E402
from offpolicy.learner.learner import Learner  # noqa: E402
from offpolicy.models.loading import cache_root, load_tokenizer  # noqa: E402
from offpolicy.models.sources import resolve_model_path  # noqa: E402
from offpolicy.runtime.validate import load_config  # noqa: E402
from offpolicy.weights.sync import LocalSync  # noqa: E402

CONFIG = ROOT / "configs" / "smollm2_cpu.yaml"
LORA = ["model.lora.r=16"]
FULL = "model.lora.r=0"
SETTINGS = {"fp32": ["learner.precision=fp32", FULL], "bf16": ["learner.precision=bf16", FULL],
            "fp32+lora": ["learner.precision=fp32", *LORA],
            "bf16+lora": ["learner.precision=bf16", *LORA]}


def matmul_peak(dtype: torch.dtype, n: int = 2048, runs: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: the median of `runs` timings after a warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def step_flops(learner: Learner) -> float:
    """FLOPs of one learner step, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        learner.step()
    return float(counter.get_total_flops())


class Products(TorchDispatchMode):
    """Records each matrix product dispatched (after autocast), op and its tensors' layouts,
    and times every other op (CPU ops run synchronously), summed by op name."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.baddbmm.default}

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, int] = {}
        self.others: dict[str, list] = {}  # op name -> [calls, seconds]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            key = (func, tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor)
                               else a for a in args))
            self.calls[key] = self.calls.get(key, 0) + 1
            return func(*args, **(kwargs or {}))
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        entry = self.others.setdefault(func.overloadpacket.__name__, [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - t
        return out


def _strided(shape: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Random values laid out as `shape` with `stride` (transposed, expanded) in fresh memory."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
    return torch.empty(size, dtype=dtype).uniform_(-1, 1).as_strided(shape, stride)


def matmul_floor(learner: Learner, runs: int = 5) -> tuple[float, int, dict]:
    """Seconds of one step's matrix products alone, replayed warm; how many products there
    were; the other ops' calls and seconds by name."""
    for _ in range(2):  # the second pass's op times: the first faults in the mode's memory
        with Products() as rec:
            learner.step()
    total = 0.0
    for (func, layout), count in rec.calls.items():
        args = [_strided(*spec) if isinstance(spec, tuple) else spec for spec in layout]
        func(*args)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            func(*args)
            times.append(time.perf_counter() - t)
        total += count * statistics.median(times)
    return total, sum(rec.calls.values()), rec.others


def adamw_line(model: torch.nn.Module, rounds: int) -> None:
    """AdamW's step on `model`'s trainable parameters (random gradients): fused (the learner's),
    foreach and one tensor at a time, alternating, median of `rounds` after a warm-up each."""
    params = [p for p in model.parameters() if p.requires_grad]
    copies = {impl: [p.detach().clone().requires_grad_() for p in params]
              for impl in ("fused", "foreach", "single")}
    opts = {impl: torch.optim.AdamW(ps, lr=1e-6, **{"fused": {"fused": True},
                                                      "foreach": {"foreach": True},
                                                      "single": {"foreach": False}}[impl])
            for impl, ps in copies.items()}
    times = {impl: [] for impl in opts}
    for r in range(rounds + 1):
        for impl, opt in opts.items():
            for p in copies[impl]:
                p.grad = torch.randn_like(p)
            t = time.perf_counter()
            opt.step()
            if r:
                times[impl].append(time.perf_counter() - t)
    med = {impl: statistics.median(v) for impl, v in times.items()}
    print(f"AdamW step on {sum(p.numel() for p in params) / 1e6:.1f}M parameters: " + ", ".join(
        f"{impl} {s:.3f} s" for impl, s in med.items())
        + f" (foreach / fused x{med['foreach'] / med['fused']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated settings (default: all)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SETTINGS)
    if importlib.util.find_spec("peft") is None:
        names = [n for n in names if "lora" not in n]
    # one core: the KL reference on the learner's own thread (a run puts it on a second one)
    base = ["engine.logprob_check_every=0", f"rollout.group_size={args.group_size}",
            "learner.reference_thread=false"]
    cfg = load_config(CONFIG, base)
    setup_process(args.threads)
    folder = resolve_model_path(cfg, cache_root(cfg))
    batch = make_batch(cfg, load_tokenizer(folder), args.groups, args.group_size)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"CPU: {_cpu()}, {args.threads} torch thread(s), torch {torch.__version__}; batch "
          f"{len(batch)} rows; matmul peak fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
          f"{peak['bf16'] / 1e9:.0f} GFLOP/s")
    learners, flops, floors, times = {}, {}, {}, {n: [] for n in names}
    for name in names:
        c = load_config(CONFIG, base + SETTINGS[name])
        learners[name] = Learner(c, str(folder), FixedBatch(batch), LocalSync())
        learners[name].step()  # warm-up
        flops[name] = step_flops(learners[name])
    for _ in range(args.steps):
        for name in names:
            t = time.perf_counter()
            learners[name].step()
            times[name].append(time.perf_counter() - t)
    for name in names:  # after the timed steps: their memory is faulted in by then
        floors[name] = matmul_floor(learners[name])
    adamw_line(learners[names[0]].model, args.steps)
    for name in names:
        s = statistics.median(times[name])
        achieved = flops[name] / s
        own = peak["bf16" if name.startswith("bf16") else "fp32"]
        print(f"{name:>10}: step {s:.2f} s (median of {args.steps}), {flops[name] / 1e9:.0f} "
              f"GFLOP/step, {achieved / 1e9:.0f} GFLOP/s = {achieved / own:.0%} of its "
              f"dtype's peak, {achieved / peak['bf16']:.0%} of the bf16 peak")
    for name in names:
        floor, n, others = floors[name]
        s = statistics.median(times[name])
        calls = sum(c for c, _ in others.values())
        top = sorted(others.items(), key=lambda kv: -kv[1][1])[:5]
        own = peak["bf16" if name.startswith("bf16") else "fp32"]
        print(f"{name:>10}: matmul floor {floor:.2f} s ({n} products replayed warm) = "
              f"{flops[name] / floor / own:.0%} of its dtype's peak, "
              f"{flops[name] / floor / peak['bf16']:.0%} of the bf16 peak if nothing else took "
              f"time; the rest of the step {s - floor:.2f} s ({(s - floor) / s:.0%}): {calls} "
              f"other ops, the most time in " + ", ".join(
                  f"{op} {sec:.2f} s ({c})" for op, (c, sec) in top))


if __name__ == "__main__":
    main()
