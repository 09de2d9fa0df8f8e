"""The checks a run makes with the model's files, in the driver before any role starts.

Reads: the base model folder, the task's prompts, this machine's free memory and disk.
Writes: nothing; raises `ConfigError`. A mistake that would otherwise fail deep inside an actor
(or run the machine out of memory) becomes one line: chat prompts for a tokenizer without a
chat template, a prompt plus `engine.max_new_tokens` longer than the model's context, a model
too big for the memory this machine has free, a weights folder without room.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offpolicy.config.plan import RunPlan
from offpolicy.config.schema import Config
from offpolicy.core.errors import ConfigError
from offpolicy.envs import env_from_config
from offpolicy.learner.sharding import check_shardable
from offpolicy.models.chat import messages_of, prompt_ids
from offpolicy.models.loading import context_limit, load_tokenizer
from offpolicy.runtime.run_dir import weights_dir
from offpolicy.weights.sync import WEIGHT_SYNCS


def preflight(cfg: Config, model_path: str | Path, plan: RunPlan | None = None) -> dict:
    """The checks that need the model's files, before any role starts; returns what it
    measured (longest prompt, memory estimate)."""
    plan = plan or RunPlan.of(cfg)
    longest = _longest_prompt(cfg, model_path)
    out = {"longest_prompt_tokens": longest}
    limit = context_limit(cfg, model_path)
    if limit and longest + cfg.engine.max_new_tokens > limit:
        key = "engine.max_model_len" if cfg.engine.max_model_len else "engine.max_new_tokens"
        raise ConfigError(f"{key}: the longest prompt has {longest} tokens, and with "
                          f"engine.max_new_tokens={cfg.engine.max_new_tokens} it does not fit "
                          f"the model's context of {limit} tokens")
    if cfg.learner.sharding == "fsdp":
        _check_blocks(Path(model_path))
    out.update(check_memory(cfg, Path(model_path), plan))
    _check_weights_dir(cfg, Path(model_path), plan)
    return out


def _longest_prompt(cfg: Config, model_path: str | Path) -> int:
    """Tokens of the longest prompt among the eval set and a few training draws (rendered
    with the chat template where the prompts are messages)."""
    tokenizer = load_tokenizer(model_path)
    lengths = []
    for split, seeds in (("eval", range(cfg.env.eval_size)), ("train", range(8))):
        env = env_from_config(cfg.env, split)
        for seed in seeds:
            try:
                prompt = env.reset(seed)
            except ValueError as e:  # e.g. too few distinct problems for env.eval_size
                raise ConfigError(f"env: {str(e).splitlines()[0]}") from None
            messages = messages_of(prompt, cfg.env.system_prompt, cfg.env.chat)
            lengths.append(len(prompt_ids(tokenizer, prompt, messages)))
    return max(lengths)


def _check_weights_dir(cfg: Config, folder: Path, plan: RunPlan) -> None:
    """A weight sync that uses a folder (filesystem) keeps `plan.file_versions` published
    versions (plus one being written) under `engine.weights_dir`: refuse a folder without room for them (a small
    /dev/shm, as in a default Docker container) before any process starts."""
    if not WEIGHT_SYNCS.lookup(plan.weight_sync).uses_folder or cfg.cluster.address:
        return
    where = weights_dir(cfg)
    while not where.exists():
        where = where.parent
    weights, versions = weights_bytes(folder), plan.file_versions + 1
    free = shutil.disk_usage(where).free
    if versions * weights > free:
        raise ConfigError(
            f"engine.weights_dir: {where} has {free / (1 << 30):.2f} GiB free, but the "
            f"published weights need about {versions * weights / (1 << 30):.2f} GiB "
            f"({versions} versions of {weights / (1 << 30):.2f} GiB); choose a larger folder")


def _check_blocks(folder: Path) -> None:
    """learner.sharding=fsdp needs the model's transformer blocks: looked for in a weightless
    copy of it (meta device), before any process starts."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    check_shardable(model, str(folder))


def check_memory(cfg: Config, folder: Path, plan: RunPlan | None = None) -> dict:
    """Estimate what the run holds in memory on this machine and refuse a run that cannot
    fit: the learner keeps float32 weights, gradients and two Adam moments (4 copies), plus
    the parity check's shadow model and history and the KL reference when on; each actor one
    copy of the weights (and vLLM its KV cache). Skipped on a cluster (other machines)."""
    plan = plan or RunPlan.of(cfg)
    weights = weights_bytes(folder)
    # 4 float32 copies per unsharded worker; sharded, 4 in all plus rank 0's gathered one
    workers = cfg.resources.learner_workers
    copies = ((5 if cfg.learner.sharding == "fsdp" else 4 * workers)
              + (cfg.loss.kl_coef > 0) * workers + plan.parity_copies)
    kv = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * (1 << 30) \
        if cfg.engine.name == "vllm" else 0
    need = weights * copies + cfg.rollout.num_actors * (weights + kv)
    available = _available_bytes()
    out = {"memory_estimate_gib": round(need / (1 << 30), 2)}
    if cfg.cluster.address or available is None or weights == 0:
        return out
    if need > available:
        raise ConfigError(
            f"model.path: {folder.name} needs about {need / (1 << 30):.1f} GiB here (learner: "
            f"{copies} float32 copies of {weights / (1 << 30):.2f} GiB of weights for weights, "
            f"gradients, Adam and checks; {cfg.rollout.num_actors} actor(s) one copy each) but "
            f"this machine has {available / (1 << 30):.1f} GiB available; use fewer actors, "
            "engine.logprob_check_every=0, or a smaller model")
    return out


def weights_bytes(folder: Path) -> int:
    """Bytes of the model's weight files (safetensors, else PyTorch .bin)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) or sum(
        f.stat().st_size for f in folder.glob("*.bin"))


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
