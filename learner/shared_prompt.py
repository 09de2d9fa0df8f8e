"""Scoring a batch with each distinct prompt run once (`learner.share_prompts`).

Reads/writes nothing. A GRPO group is `rollout.group_size` completions of one prompt, and with
a chat template the prompt is often most of each row: SmolLM2's 45-token prompt against
answers of 2-16 tokens. `sequence_logprobs` runs the model over each distinct prompt once,
keeps its keys and values (a key/value cache, still part of the autograd graph),
repeats them for every row of that prompt, and runs only the completions on top. The
log-probs, and the gradients (which sum over the rows that share a prompt, as the plain
forward's would), equal the plain padded forward's up to float rounding; tests/test_shared_prompt.py
checks both. On SmolLM2 (16 rows, 2 prompts) a forward and backward went from 6.9 s to
3.9 s on one core (`benchmarks/shared_prompt.py`).

Used for every scoring pass of the learner: the training forward, the proximal pass, the KL
reference and the engine parity check. A micro-batch without a repeated prompt, or a model
whose forward takes no `logits_to_keep` (the cache needs it to score the prompt's last
position only), takes the plain padded forward (`token_logprobs`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from offpolicy.algorithms.logprobs import (cache_argument, scored, takes_logits_to_keep,
                                           token_logprobs)
from offpolicy.core.types import PaddedBatch


def sequence_logprobs(model, c: PaddedBatch, temperature: float = 1.0,
                      entropy: bool = False, entropy_grad: bool = True, start: int = 0,
                      share: bool = True):
    """(B, L-1) log-probs of `c.targets` (and with `entropy`, the entropies), laid out as
    `token_logprobs` lays them out. `c` is a micro-batch of `Batch.padded`, as tensors."""
    prompts = _distinct_prompts(c) if share and takes_logits_to_keep(type(model)) else None
    if prompts is None:
        return token_logprobs(model, c.input_ids, c.attention_mask, c.targets,
                              temperature, entropy=entropy, entropy_grad=entropy_grad,
                              start=start)
    return _shared(model, c, *prompts, temperature, entropy, entropy_grad)


def _distinct_prompts(c: PaddedBatch):
    """(prompt ids (U, P) right-padded, their lengths (U,), each row's prompt index (B,)),
    or None when no two rows share a prompt."""
    ids, lens = c.input_ids, c.prompt_lens
    P = int(lens.max())
    keyed = ids[:, :P].masked_fill(torch.arange(P, device=ids.device) >= lens[:, None], -1)
    unique, row_prompt = torch.unique(keyed, dim=0, return_inverse=True)        # (U, P), (B,)
    if len(unique) == len(ids):
        return None
    plens = (unique >= 0).sum(1)                                                # (U,)
    return unique.clamp(min=0), plens, row_prompt


def _shared(model, c: PaddedBatch, prompt_ids, plens, row_prompt, temperature, entropy,
            entropy_grad):
    B, L = c.input_ids.shape
    U, P = prompt_ids.shape
    dev = prompt_ids.device
    prompt_mask = (torch.arange(P, device=dev) < plens[:, None]).long()          # (U, P)
    # the prompts' forward: keys and values of every position, logits at each prompt's last
    # position (they predict the first completion token)
    last = torch.unique(plens - 1)
    # the forward fills a cache of ours, under whichever name this transformers version takes
    cache, cache_arg = DynamicCache(config=model.config), cache_argument(model)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                logits_to_keep=last, **{cache_arg: cache})
    first_logits = out.logits[torch.arange(U, device=dev),
                              torch.searchsorted(last, plens - 1)]              # (U, V)
    cache.batch_select_indices(row_prompt)  # every row gets its prompt's keys and values
    # the completions on top: row i's token k sits at position plens[i] + k
    rlens = plens[row_prompt]                                                   # (B,)
    C = int((c.attention_mask.sum(1) - rlens).max())
    cols = rlens[:, None] + torch.arange(C, device=dev)                          # (B, C)
    inside = cols < L
    comp_ids = c.input_ids.gather(1, cols.clamp(max=L - 1)) * inside
    comp_mask = c.attention_mask.gather(1, cols.clamp(max=L - 1)) * inside
    out = model(input_ids=comp_ids, attention_mask=torch.cat([prompt_mask[row_prompt],
                                                              comp_mask], 1),
                position_ids=cols, use_cache=True, **{cache_arg: cache})
    logits = torch.cat([first_logits[row_prompt, None], out.logits[:, :-1]], 1)  # (B, C, V)
    out = scored(logits, comp_ids, temperature, entropy, entropy_grad)              # (B, C)
    picked, ent = out if entropy else (out, None)
    # back to the padded layout: completion token k's target index is plens + k - 1
    where = (cols - 1).clamp(max=L - 2)
    # (positions past the end of the padded row, clamped onto its last target, add zeros)
    lp = torch.zeros(B, L - 1, device=dev, dtype=picked.dtype).scatter_add(
        1, where, picked * comp_mask)
    if not entropy:
        return lp
    return lp, torch.zeros_like(lp).scatter_add(1, where, ent * comp_mask)
