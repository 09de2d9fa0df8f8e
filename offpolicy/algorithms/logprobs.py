"""Scoring tokens with a causal LM: per-token log-probs and entropies, and the forward's names.

Reads: a model and token tensors. Writes: nothing. `token_logprobs` is the plain padded forward
every scoring pass falls back to (the learner's shared-prompt scoring,
`offpolicy/learner/shared_prompt.py`, builds on it). `takes_logits_to_keep` and
`cache_argument` tell which keyword names a model's forward takes, so callers pass whichever
this transformers version has instead of a name it warns about.
"""

from __future__ import annotations

import functools
import inspect

import torch


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   targets: torch.Tensor, temperature: float = 1.0,
                   entropy: bool = False, entropy_grad: bool = True, start: int = 0):
    """(B, L-1) log-prob of each next token under `model`, logits divided by `temperature`.

    With `entropy`, also the (B, L-1) entropy of each position's next-token distribution, from
    the same logits: differentiable (an entropy bonus) when `entropy_grad`, else detached, which
    keeps no (B, L-1, V) softmax for the backward pass.
    `start`: the first target position the caller needs (the earliest completion token); the
    output layer runs on positions from there on only (the prompt's logits would be thrown
    away: with a 49k vocabulary they are most of the memory traffic), earlier ones are 0.
    """
    L = input_ids.shape[1]
    start = max(0, min(start, L - 1))
    keep = ({"logits_to_keep": L - start} if start and takes_logits_to_keep(type(model))
            else {})
    if not keep:
        start = 0
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **keep).logits[:, :-1]
    out = scored(logits, targets[:, start:], temperature, entropy, entropy_grad, owned=False)
    pad = torch.nn.functional.pad
    return tuple(pad(t, (start, 0)) for t in out) if entropy else pad(out, (start, 0))


def scored(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool,
           entropy_grad: bool, owned: bool = True):
    """(..., T) log-probs of `targets` under (..., T, V) `logits` / `temperature` (and with
    `entropy` the entropies), in float32. Each (..., V) float32 copy is 50 MB for 16 rows of
    16 tokens at a 49k vocabulary, so the work is done in as few of them as the backward pass
    allows (`_Picked`). `owned`: `logits` is the caller's to overwrite (else float32 logits are
    copied first)."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    elif not owned and temperature != 1.0:
        logits = logits.clone()
    if temperature != 1.0:
        logits.div_(temperature)  # (neither the copy nor the division keeps its output)
    if not (entropy and entropy_grad):
        picked, ent = _Picked.apply(logits, targets, entropy)
        return (picked, ent) if entropy else picked
    # a differentiable entropy (an entropy bonus): H = logsumexp(x) - sum softmax(x) * x
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return picked, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


# exp(x - max) below e^-80 (1.8e-35) is taken as e^-80: next to the max's own term, 1, that is
# far below float32's resolution, so the sums are unchanged. It keeps exp above float32's
# normal range, below which torch's CPU exp runs 9-20x slower: a model's logits span over 80
# nats (SmolLM2's do), and torch's logsumexp and its backward pay for that on every row.
EXP_FLOOR = -80.0


class _Picked(torch.autograd.Function):
    """log_softmax(x)[y] = x[y] - max - log(sum exp(x - max)), and optionally the entropy
    (not differentiable), from one float32 (..., V) buffer: exp(x - max), which becomes the
    softmax for the backward pass, where it is overwritten in place by the gradient
    (onehot(y) - softmax) * g. So the backward can run only once (no `retain_graph`)."""

    @staticmethod
    def forward(ctx, logits, targets, entropy):
        top = logits.amax(-1, keepdim=True)                                     # (..., 1)
        p = (logits - top).clamp_(min=EXP_FLOOR).exp_()                         # (..., V)
        total = p.sum(-1)
        lse = top.squeeze(-1) + total.log()
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        # H = lse - sum softmax(x) * x
        ent = lse - torch.linalg.vecdot(p, logits) / total if entropy else None
        if ctx.needs_input_grad[0]:  # the softmax, for the backward pass only
            ctx.save_for_backward(p.div_(total.unsqueeze(-1)), targets)
        ctx.spent = False
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return picked, ent

    @staticmethod
    def backward(ctx, grad, _):
        if ctx.spent:
            raise RuntimeError("scored: a second backward through the same log-probs "
                               "(its softmax was overwritten by the first)")
        ctx.spent = True
        p, targets = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        return p.mul_(-g).scatter_add_(-1, targets.unsqueeze(-1), g), None, None


def first_target(loss_mask: torch.Tensor) -> int:
    """The first target position any row needs (`token_logprobs`' `start`)."""
    cols = loss_mask.bool().any(0)
    return int(cols.float().argmax()) if bool(cols.any()) else 0


@functools.cache
def takes_logits_to_keep(model_class: type) -> bool:
    """Whether the model's forward can compute logits for the last positions only (asked
    once per model class: `token_logprobs` runs for every micro-batch)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def cache_argument(model) -> str:
    """The name under which `model`'s forward takes its key/value cache: transformers renamed
    `past_key_values` to `cache` (5.2x) and warns on every call that uses the old name."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
