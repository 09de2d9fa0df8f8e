"""The tiny base model: a character-level Llama, supervised just enough to succeed sometimes.

Reads: the task (`env.name`) and the recipe (`model.tiny`). Writes: `<cache>/tiny-<env>-<recipe
hash>/` (a normal HF folder: config, safetensors, tokenizer, `offpolicy_build.json`).

Without a GPU or hub access RL needs a base model that already succeeds sometimes: RL mostly
amplifies behaviour the base model has. So the tiny model is supervised on the task's reference
solutions (mixed with its systematic mistake, where the task has one) until its greedy accuracy
on a probe set settles, then saved. The cache key hashes the recipe (architecture, warm-up
settings, task, RECIPE_VERSION), so a changed recipe rebuilds and an unchanged one loads in a
second. `sources.ensure_base_model` decides between this and `model.path`.
"""

from __future__ import annotations

import hashlib
import json
import string
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from offpolicy.config.schema import Config, EnvConfig
from offpolicy.core.errors import ConfigError
from offpolicy.core.process import environment_info
from offpolicy.envs import env_from_config
from offpolicy.models.loading import left_pad

RECIPE_VERSION = 3
"""Bump when the build code changes in a way that changes the model."""

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")


def char_tokenizer():
    """A character-level tokenizer (one token per printable ASCII char) as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    # BPE with no merges splits text into single characters; Fuse joins them back on decode.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def tiny_llama(vocab_size: int, cfg: Config, tokenizer) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.model.tiny
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.model.tiny.seed)
    return LlamaForCausalLM(config)


def base_env(cfg: Config) -> EnvConfig:
    """`cfg.env` as the tiny base model is built for it: with the task's `base_model_kwargs`
    when it has them (a long task is built at length 1 and the model serves every length; its
    `env.eval_kwargs` are the run's yardstick, not the build's)."""
    over = getattr(env_from_config(cfg.env), "base_model_kwargs", None)
    return cfg.env if not over else replace(cfg.env, kwargs={**cfg.env.kwargs, **over},
                                            eval_kwargs={})


def recipe_key(cfg: Config) -> str:
    tiny = asdict(cfg.model.tiny)
    recipe = {"version": RECIPE_VERSION, "tiny": tiny, "env": cfg.env.name,
              "env_kwargs": base_env(cfg).kwargs, "eval_size": cfg.env.eval_size,
              "seed": tiny.pop("seed"),
              "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


class BuildError(ConfigError):
    """The tiny base model did not reach a usable accuracy; the message says how far it got
    (a config problem: the `model.tiny` recipe, so a one-line error with exit 2)."""


def build_tiny_model(cfg: Config, out: Path, log=print) -> dict:
    """Supervise a fresh tiny Llama on demonstrations until it is a usable base model.

    For a task with a systematic mistake (`flawed` demonstrations, addition's dropped carry),
    a share `flawed_share` of the demonstrations shows the mistake. Training runs until the
    probe accuracy has sat inside `base_accuracy` for `sft_settle_checks` checks in a row: the
    plateau the mixture defines, reached whatever the machine's floating point. Other tasks
    stop at the first check at or above `sft_target_accuracy`. A build that ends outside
    `base_accuracy` raises BuildError. Writes the model and `offpolicy_build.json`.
    """
    t = cfg.model.tiny
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    env_cfg = base_env(cfg)
    env = env_from_config(env_cfg)
    try:
        env.reset(0)
        env.demonstration()
    except (NotImplementedError, AttributeError):
        raise ConfigError(f"model.path: env '{cfg.env.name}' has no reference solutions to "
                          "build a tiny model from; set model.path to a model folder") from None
    flawed = t.flawed_share > 0 and _has_flawed(env)
    lo, hi = t.base_accuracy
    goal = (f"{t.flawed_share:.0%} flawed demonstrations, until greedy accuracy settles in "
            f"[{lo}, {hi}]" if flawed else f"until greedy accuracy >= {t.sft_target_accuracy}")
    log(f"building tiny base model ({n_params / 1e6:.2f}M params) for env '{cfg.env.name}' "
        f"({goal}) -> {out}")
    start = time.time()
    step, acc = _supervise(cfg, env_cfg, model, tokenizer, env, flawed, log)
    info = {"recipe": recipe_key(cfg), "sft_steps": step, "probe_accuracy": acc,
            "build_s": round(time.time() - start, 1), "params": n_params,
            "flawed_share": t.flawed_share if flawed else 0.0, **environment_info()}
    if not lo <= acc <= hi:
        raise BuildError(
            f"tiny base model build failed: probe greedy accuracy {acc:.2f} after {step} "
            f"supervised steps is outside model.tiny.base_accuracy [{lo}, {hi}] (RL needs a "
            f"base that succeeds sometimes); try another model.tiny.seed or raise "
            f"model.tiny.sft_max_steps")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "offpolicy_build.json").write_text(json.dumps(info, indent=1))
    log(f"built in {info['build_s']:.0f}s: {step} supervised steps, probe greedy accuracy "
        f"{acc:.2f}")
    return info


def _supervise(cfg: Config, env_cfg: EnvConfig, model, tokenizer, env, flawed: bool,
               log) -> tuple[int, float]:
    """The warm-up loop of `build_tiny_model`: AdamW with linear warm-up, a probe check every
    `sft_check_every` steps, until the stop rule holds or `sft_max_steps`. Returns (steps taken,
    the last probe accuracy)."""
    t = cfg.model.tiny
    lo, hi = t.base_accuracy
    probe = [t.seed * 7919 + 10_000_000 + i for i in range(200)]
    opt = torch.optim.AdamW(model.parameters(), lr=t.sft_lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(t.sft_warmup_steps, 1)))
    rng = np.random.default_rng(t.seed)
    start, acc, step, settled = time.time(), 0.0, 0, 0
    for step in range(1, t.sft_max_steps + 1):
        seeds = rng.integers(0, 2**31, size=t.sft_batch_size)
        show_flawed = rng.random(t.sft_batch_size) < t.flawed_share if flawed else None
        loss = _sft_loss(model, tokenizer, env, seeds, show_flawed)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        if step % t.sft_check_every:
            continue
        acc = evaluate(model, tokenizer, env_cfg, probe, cfg.engine.max_new_tokens, split="train")
        settled = settled + 1 if lo <= acc <= hi else 0
        if step % (4 * t.sft_check_every) == 0 or (flawed and settled):
            log(f"  sft step {step}: loss {loss.item():.3f}, probe greedy accuracy {acc:.2f}"
                f"{f' (in range {settled}/{t.sft_settle_checks})' if flawed and settled else ''} "
                f"({time.time() - start:.0f}s)")
        done = settled >= t.sft_settle_checks if flawed else acc >= t.sft_target_accuracy
        if done:
            break
    return step, acc


def _has_flawed(env) -> bool:
    try:
        env.demonstration(flawed=True)
        return True
    except (NotImplementedError, TypeError):
        return False


def build_info(model_dir: str | Path) -> dict | None:
    """The `offpolicy_build.json` of a built tiny model, or None for any other model."""
    try:
        return json.loads((Path(model_dir) / "offpolicy_build.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def demo_batch(tokenizer, env, seeds, flawed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), both (B, L), of one demonstration episode per seed (the task's flawed
    one where `flawed[i]`). Labels are the policy's tokens (each turn closed by
    end-of-sequence); prompt, observations and padding are -100."""
    rows, masks = [], []
    for i, s in enumerate(seeds):
        row = tokenizer(env.reset(int(s)))["input_ids"]
        mask = [False] * len(row)
        pieces = env.demonstration(flawed=True) if flawed is not None and flawed[i] else \
            env.demonstration()
        for text, policy in pieces:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids + [tokenizer.eos_token_id] if policy else ids
            row, mask = row + ids, mask + [policy] * len(ids)
        rows.append(row)
        masks.append(mask)
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    labels = torch.full((len(rows), L), -100)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.where(torch.tensor(mask), torch.tensor(row), -100)
    return ids, labels


def _sft_loss(model, tokenizer, env, seeds, flawed=None) -> torch.Tensor:
    """Next-token cross-entropy on the policy's tokens of demonstration episodes."""
    ids, labels = demo_batch(tokenizer, env, seeds, flawed)
    logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, tokenizer, env_cfg, seeds: list[int], max_new_tokens: int,
             split: str = "eval", batch_size: int = 256) -> float:
    """Mean reward of greedy episodes on the problems `seeds` pick from `split`.

    Played as the rollout actor plays them: every turn one batched generation over the running
    episodes, the completion (end-of-sequence included) and the environment's observation
    appended to the context (or, for a segmented environment, the observation as the next
    call's whole context), until done or `env_cfg.max_turns`. An environment that raises
    ends its episode with the reward so far.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(seeds), batch_size):
        envs = [env_from_config(env_cfg, split) for _ in seeds[i:i + batch_size]]
        contexts = [tokenizer(env.reset(s))["input_ids"] for env, s in zip(envs, seeds[i:])]
        rewards = [0.0] * len(envs)
        active = list(range(len(envs)))
        for _ in range(env_cfg.max_turns):
            outs = greedy_generate(model, tokenizer, [contexts[k] for k in active], max_new_tokens)
            running = []
            for k, ids in zip(active, outs):
                try:
                    obs, reward, done, _ = envs[k].step(tokenizer.decode(ids,
                                                                         skip_special_tokens=True))
                except Exception:
                    continue
                rewards[k] += float(reward)
                if not done and obs is not None:
                    if getattr(envs[k], "segmented", False):
                        contexts[k] = tokenizer(obs)["input_ids"]
                    else:
                        obs_ids = tokenizer(obs, add_special_tokens=False)["input_ids"]
                        contexts[k] = contexts[k] + ids + obs_ids
                    running.append(k)
            if not (active := running):
                break
        total += sum(rewards)
    model.train(was_training)
    return total / max(len(seeds), 1)


def greedy_generate(model, tokenizer, prompts: list[list[int]],
                    max_new_tokens: int) -> list[list[int]]:
    """Greedy completions of token-id prompts: each cut after its first end-of-sequence (kept)."""
    ids, attn = left_pad(prompts, tokenizer.pad_token_id)
    width = ids.shape[1]
    out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                         do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rows = []
    for row in out[:, width:].tolist():
        n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        rows.append(row[:n])
    return rows
