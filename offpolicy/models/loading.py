"""Loading Hugging Face models and tokenizers, and building a model folder exactly once.

Reads: HF folders. Writes: a model folder under the cache (`build_once`), through an atomic
rename. Every loader turns a folder that will not load into a one-line ConfigError.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import torch

from offpolicy.config.schema import Config
from offpolicy.core.errors import ConfigError


def cache_root(cfg: Config) -> Path:
    root = cfg.model.cache_dir or os.environ.get("OFFPOLICY_CACHE") or "~/.cache/offpolicy"
    return Path(root).expanduser()


def build_once(out: Path, build) -> Path:
    """The model folder `out`, made by `build(tmp)` if it is not there yet. Several processes
    (tests, a quickstart) may ask at once: one builds, the others wait; the folder appears
    by an atomic rename, so a half-built model is never picked up."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            tmp = out.parent / f"{out.name}.tmp{os.getpid()}"
            build(tmp)
            os.replace(tmp, out)
    return out


def load_tokenizer(path: str | Path):
    """The tokenizer of a HF folder (pad falls back to eos); one-line ConfigError on failure."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load {path}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_limit(cfg: Config, model_path: str | Path) -> int:
    """The longest context the engine takes (`engine.max_model_len`, else the model's
    `max_position_embeddings`); 0 when unknown."""
    if cfg.engine.max_model_len:
        return cfg.engine.max_model_len
    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())
                   .get("max_position_embeddings") or 0)
    except (OSError, ValueError):
        return 0


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32,
                attention: str | None = None):
    """(model, tokenizer) from a HF folder; a one-line ConfigError when it is not loadable.
    `attention`: transformers' `attn_implementation` (None: its default)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    extra = {"attn_implementation": attention} if attention else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load {path}: {str(e).splitlines()[0]}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"model.path: tokenizer of {path} has {len(tokenizer)} tokens but the "
                          f"model only {model.get_input_embeddings().num_embeddings} embeddings")
    return model, tokenizer


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, W): left padding, so every prompt ends at column W
    and generated tokens line up."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    return ids, attn


def frozen_in_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, which takes no gradient, with its matrices (linear and embedding weights) held in
    bfloat16 for autocast: autocast casts a float32 weight that takes no gradient again at
    every use. Norms stay float32, and the embedding's output is cast to float32, so the
    residual stream stays float32 as it is with float32 weights (only the matrix products see
    bfloat16). Returns `model`."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.to(torch.bfloat16)
    model.get_input_embeddings().register_forward_hook(lambda _m, _args, out: out.float())
    return model
