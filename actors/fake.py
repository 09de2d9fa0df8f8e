"""A fake generation engine for tests and load tests: random tokens at no cost, no model.

Reads: the tokenizer of a model folder (for its vocabulary and end-of-sequence id).
Writes: nothing. Completions are uniform random tokens, 1 to max_new_tokens long, with the
uniform log-prob -log(V) each and the version of the last weights "loaded": the shape of real
output without the cost, so the buffer, the actors' loop and Ray are what a run exercises.
"""

from __future__ import annotations

import math

import numpy as np

from offpolicy.actors.engine import Completion, SamplingParams, register_engine
from offpolicy.models.loading import load_tokenizer


class FakeEngine:
    def __init__(self, model_path: str, seed: int = 0):
        tokenizer = load_tokenizer(model_path)
        self.vocab, self.eos_id = len(tokenizer), tokenizer.eos_token_id
        self.rng = np.random.default_rng(seed)
        self.version = 0

    def load_weights(self, version: int, source) -> None:
        self.version = version  # no weights: only the version tag changes

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 between_steps=None) -> list[Completion]:
        out = []
        for _ in prompts:
            n = int(self.rng.integers(1, sampling.max_new_tokens + 1))
            ids = self.rng.integers(0, self.vocab, n).astype(np.int32)
            finish = "length" if n == sampling.max_new_tokens else "stop"
            if finish == "stop":
                ids[-1] = self.eos_id
            out.append(Completion(ids, np.full(n, -math.log(self.vocab), np.float32), finish,
                                  np.full(n, self.version, np.int32)))
        return out


@register_engine("fake")
def _fake(cfg, model_path: str, seed: int) -> FakeEngine:
    return FakeEngine(model_path, seed=seed)
