"""`learner.precision: bf16` and `model.lora`: parity with the engine, float32 master weights,
and the LoRA round trip (train, checkpoint, resume, publish merged weights)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import OneBatch, fast_config
from offpolicy.core.errors import ConfigError
from offpolicy.core.types import Batch, Trajectory
from offpolicy.learner.learner import Learner
from offpolicy.learner.lora import merged_state
from offpolicy.runtime.validate import load_config
from offpolicy.tools.cli import main
from offpolicy.weights.sync import LocalSync


def _parity(run_dir) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["engine/logprob_abs_diff"] for m in lines if "engine/logprob_abs_diff" in m]


def _serial(model_dir, run_dir, *overrides) -> int:
    args = [f"model.path={model_dir}", "rollout.prompts_per_batch=4", "rollout.group_size=4",
            "learner.batch_groups=4", "eval.every=4", "env.eval_size=8", "learner.lr=1e-3",
            "resources.serial=true", f"run.dir={run_dir}", *overrides]
    return main(["train", "configs/quickstart.yaml", *args])


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.02)])
def test_engine_and_learner_agree_within_the_precisions_tolerance(model_dir, tmp_path,
                                                                  precision, tolerance,
                                                                  monkeypatch, capsys):
    """The hf engine follows learner.precision; the parity check (the generating weights
    re-scored by the learner) stays within the documented tolerance, and a bf16 learner keeps
    float32 weights (autocast compute only). On a CPU without native bf16 a bf16 run says so."""
    monkeypatch.setattr("offpolicy.runtime.launch.cpu_bf16", lambda: False)
    run = tmp_path / precision
    assert _serial(model_dir, run, "learner.steps=4", f"learner.precision={precision}",
                   "engine.logprob_check_every=1") == 0
    warned = "warning: learner.precision=bf16 on a CPU without" in capsys.readouterr().out
    assert warned == (precision == "bf16")
    diffs = _parity(run)
    assert len(diffs) >= 3 and max(diffs) < tolerance
    if precision == "bf16":
        assert max(diffs) > 1e-6  # the engine really computed in bf16
    state = load_file(str(run / "checkpoints" / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())


def _batch(vocab: int, seed: int = 0) -> Batch:
    """2 groups of 4 completions, rewards 0/1 within each (non-zero advantages)."""
    rng, trajs = np.random.default_rng(seed), []
    for g in range(2):
        prompt = rng.integers(3, vocab, 6).astype(np.int32)
        for i in range(4):
            T = int(rng.integers(2, 6))
            trajs.append(Trajectory(f"{g}-{i}", str(g), prompt,
                                    rng.integers(3, vocab, T).astype(np.int32),
                                    np.ones(T, np.int8), np.full(T, -2.0, np.float32),
                                    np.zeros(T, np.int32), float(i % 2), "e", "stop"))
    return Batch(trajs, 0)


def test_lora_trains_adapters_only_with_the_base_as_kl_reference(model_dir):
    """Only adapter weights get optimizer state and move; the KL reference is the base with
    the adapters off (no second model): KL 0 at the first step (B = 0), above 0 after."""
    cfg = fast_config(model_dir, "model.lora.r=4", "loss.kl_coef=0.1", "learner.lr=1e-2",
                      "engine.logprob_check_every=0")
    learner = Learner(cfg, str(model_dir), OneBatch(_batch(40)), LocalSync())
    assert learner.reference is None and learner.reference_is_base
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    first = learner.step()
    assert first["kl/ref"] == pytest.approx(0.0, abs=1e-7)
    assert learner.step()["kl/ref"] > 0
    after = learner.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".lora_" in k for k in moved)
    assert len(learner.opt.state) == sum(p.requires_grad for p in learner.model.parameters())


def test_lora_round_trip_checkpoint_resume_and_publish(base_model, tmp_path):
    """Train with adapters through the CLI (actors load the merged weights every publish),
    checkpoint, resume from the adapter, and check what the folders hold."""
    run = tmp_path / "run"
    lora = ["model.lora.r=4", "loss.kl_coef=0.1", "checkpoint.every=2"]
    assert _serial(base_model, run, "learner.steps=4", *lora) == 0
    ck = run / "checkpoints" / "step-000002" / "model"
    assert (ck / "adapter" / "adapter_config.json").is_file()
    final = run / "checkpoints" / "final"
    merged, base = (load_file(str(p / "model.safetensors")) for p in (final, base_model))
    assert merged.keys() == base.keys()  # the base model's own names: any engine loads it
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all("proj" in k for k in changed)  # only the adapted layers moved
    assert main(["train", "--resume", str(run), "learner.steps=6"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 6

    # the resumed learner rebuilt base + adapter: its merged weights are the checkpoint's
    cfg = fast_config(base_model, *lora[:2], "engine.logprob_check_every=0")
    resumed = Learner(cfg, str(run / "checkpoints" / "step-000004" / "model"), OneBatch(None),
                      LocalSync())
    assert resumed.reference is None and resumed.reference_is_base  # no second copy
    saved = load_file(str(run / "checkpoints" / "step-000004" / "model" / "model.safetensors"))
    for k, v in merged_state(resumed.model).items():  # (tied lm_head: saved once)
        if k in saved:
            torch.testing.assert_close(v, saved[k], atol=1e-6, rtol=0)


def test_lora_with_fsdp_is_refused_in_one_line(model_dir):
    with pytest.raises(ConfigError, match=r"^model.lora: not supported with "
                                          r"learner.sharding=fsdp"):
        fast_config(model_dir, "model.lora.r=4", "learner.sharding=fsdp")


def test_the_warm_up_changes_no_step_and_no_resumed_optimizer(model_dir):
    """The learner's warm-up (while the first batch is generated) leaves the first steps exactly
    as they would be without it, and skips AdamW when its state came from a checkpoint."""
    cfg = fast_config(model_dir, "engine.logprob_check_every=0", "loss.kl_coef=0.1")
    warmed, plain = (Learner(cfg, str(model_dir), OneBatch(_batch(40)), LocalSync())
                     for _ in range(2))
    warmed.warm_up()
    for _ in range(2):
        warmed.step(), plain.step()
    for (k, a), b in zip(warmed.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), k
    moments = [s["exp_avg_sq"].clone() for s in warmed.opt.state.values()]
    warmed.warm_up()  # as after a resume: the optimizer has state
    assert all(torch.equal(m, s["exp_avg_sq"]) for m, s in zip(moments,
                                                               warmed.opt.state.values()))


@pytest.mark.parametrize("lora", [0, 4])
def test_bf16_holds_frozen_weights_in_bf16_and_trains_float32(model_dir, lora):
    """Under bf16 the matrices that take no gradient (a LoRA base, the full model's KL
    reference) are held in bf16, their norms and the trained weights in float32, and the
    residual stream stays float32; a LoRA publish is merged in float32 and cast once, and a
    checkpoint's merged weights stay float32."""
    from offpolicy.learner.lora import scoring_module

    cfg = fast_config(model_dir, f"model.lora.r={lora}", "loss.kl_coef=0.1",
                      "learner.precision=bf16", "engine.logprob_check_every=0")
    learner = Learner(cfg, str(model_dir), OneBatch(_batch(40)), LocalSync())
    frozen = [scoring_module(learner.reference or learner.model)]
    matrices = {p for m in frozen for mod in m.modules()
                if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))
                for p in mod.parameters(recurse=False) if not p.requires_grad}
    rest = {p for m in frozen for p in m.parameters() if not p.requires_grad} - matrices
    assert matrices and all(p.dtype == torch.bfloat16 for p in matrices)
    assert rest and all(p.dtype == torch.float32 for p in rest)  # the norms
    assert all(p.dtype == torch.float32 for p in learner.model.parameters() if p.requires_grad)
    with learner.autocast(), torch.no_grad():
        hidden = frozen[0](input_ids=torch.tensor([[3, 4, 5]]), output_hidden_states=True)
    assert all(h.dtype == torch.float32 for h in hidden.hidden_states)
    assert np.isfinite(learner.step()["learner/loss"])
    if lora:
        full, half = merged_state(learner.model), merged_state(learner.model, torch.bfloat16)
        assert all(v.dtype == torch.float32 for v in full.values())
        assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in full.items())


def test_the_reference_thread_keeps_the_policys_cached_weight_casts():
    """autocast's cache of cast weights is process-wide and emptied when any thread leaves its
    outermost autocast: the reference thread never leaves its own, so a reference pass in the
    middle of the policy's forward leaves the policy's casts (and the way their gradients are
    summed) as they are. A plain thread doing the same empties the cache."""
    from concurrent.futures import ThreadPoolExecutor

    from offpolicy.learner.parallel import reference_thread

    cfg = load_config(None, ["learner.precision=bf16"])
    autocast = lambda: torch.autocast("cpu", torch.bfloat16)  # noqa: E731
    w, x = torch.nn.Parameter(torch.randn(4, 4)), torch.randn(2, 4)

    def score():
        with autocast():
            return torch.nn.functional.linear(x, w.detach())

    def cast_nodes(pool):
        with autocast():
            first = torch.nn.functional.linear(x, w)
            pool.submit(score).result()  # a reference pass between two uses of w
            second = torch.nn.functional.linear(x, w)
        return [cast_of(y.grad_fn) for y in (first, second)]

    def cast_of(node):  # the ToCopyBackward node below a linear's output (w cast to bf16)
        while node.name() != "ToCopyBackward0":
            node = next(f for f, _ in node.next_functions if f is not None)
        return node

    held, plain = cast_nodes(reference_thread(cfg.learner, torch.device("cpu"), autocast)), \
        cast_nodes(ThreadPoolExecutor(1))
    assert held[0] is held[1]  # one cast of w, reused
    assert plain[0] is not plain[1]
    assert reference_thread(cfg.learner, torch.device("meta"), autocast) is None


def test_the_reference_thread_changes_no_bit_of_a_bf16_update(model_dir):
    """The full model's KL reference scored beside the policy's forward, or after it on the
    same thread: the same loss, KL and weights, step for step."""
    runs = {}
    for on in (True, False):
        cfg = fast_config(model_dir, "loss.kl_coef=0.1", "learner.precision=bf16",
                          "engine.logprob_check_every=0", f"learner.reference_thread={on}")
        learner = Learner(cfg, str(model_dir), OneBatch(_batch(40)), LocalSync())
        assert (learner.beside is not None) == on
        runs[on] = [(m["learner/loss"], m["kl/ref"]) for m in (learner.step(), learner.step(),
                                                               learner.step())]
        runs[on].append([p.detach().clone() for p in learner.model.parameters()])
    assert runs[True][:3] == runs[False][:3] and runs[True][2][1] > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[True][3], runs[False][3]))
