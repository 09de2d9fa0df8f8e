"""learner.share_prompts: scoring each distinct prompt once gives the plain padded forward's
log-probs, entropies and gradients (learner/shared_prompt.py)."""

import numpy as np
import torch
from conftest import OneBatch, fast_config

from offpolicy.learner.shared_prompt import sequence_logprobs
from offpolicy.algorithms.logprobs import token_logprobs
from offpolicy.models.loading import load_policy
from offpolicy.core.types import Batch, Trajectory


def _batch(seed: int, groups: list[tuple[int, int]], vocab: int, env_tokens: bool = False):
    """Groups of (prompt length, completions), completions of 1-9 tokens; with `env_tokens`
    a middle stretch of each completion is masked (an environment's tokens)."""
    rng, trajs = np.random.default_rng(seed), []
    for g, (P, n) in enumerate(groups):
        prompt = rng.integers(3, vocab, P).astype(np.int32)
        for i in range(n):
            T = int(rng.integers(1, 10))
            mask = np.ones(T, np.int8)
            if env_tokens and T > 4:
                mask[2:4] = 0
            trajs.append(Trajectory(f"{g}-{i}", str(g), prompt, rng.integers(3, vocab, T)
                                    .astype(np.int32), mask, np.zeros(T, np.float32),
                                    np.zeros(T, np.int32), 0.0, "e", "stop"))
    return Batch(trajs, 0).padded(0).map(torch.from_numpy)


def _both(model, d, **kw):
    plain = token_logprobs(model, d.input_ids, d.attention_mask, d.targets, 0.7,
                           entropy=True, **kw)
    shared = sequence_logprobs(model, d, 0.7, entropy=True, **kw)
    return plain, shared


def _grads(model, lp, mask):
    model.zero_grad()
    (lp * mask).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_shared_prompts_match_the_plain_forward(model_dir):
    model, tok = load_policy(model_dir)
    # prompts of different lengths (the shorter is right-padded in the prompts' forward), one
    # prompt alone, environment tokens inside completions
    d = _batch(0, [(7, 4), (5, 3), (9, 1)], len(tok), env_tokens=True)
    mask = d.loss_mask
    # every completion token's target position, the environment's tokens included
    j = torch.arange(mask.shape[1])
    comp = ((j >= d.prompt_lens[:, None] - 1)
            & (j < d.attention_mask.sum(1, keepdim=True) - 1)).float()
    (lp, ent), (slp, sent) = _both(model, d)
    assert ((lp - slp) * comp).abs().max() < 1e-5
    assert ((ent - sent) * comp).abs().max() < 1e-5
    assert (slp * (1 - comp)).abs().max() == 0  # the prompts' and the padding's positions
    # the gradient flows into the prompt's keys and values once per row that reads them
    g_plain, g_shared = _grads(model, lp, mask), _grads(model, slp, mask)
    assert (g_plain - g_shared).norm() / g_plain.norm() < 1e-5


def test_the_shared_path_is_not_taken_without_a_repeated_prompt(model_dir, monkeypatch):
    import offpolicy.learner.shared_prompt as sp

    model, tok = load_policy(model_dir)
    called = []
    monkeypatch.setattr(sp, "_shared", lambda *a: called.append(1))
    sequence_logprobs(model, _batch(1, [(6, 1), (6, 1)], len(tok)))
    assert not called
    sequence_logprobs(model, _batch(1, [(6, 2)], len(tok)), share=False)
    assert not called
    sequence_logprobs(model, _batch(1, [(6, 2)], len(tok)))
    assert called


def test_a_learner_step_is_the_same_with_and_without_sharing(model_dir):
    from offpolicy.learner.learner import Learner
    from offpolicy.weights.sync import LocalSync

    results = []
    for share in ("true", "false"):
        cfg = fast_config(model_dir, f"learner.share_prompts={share}", "loss.kl_coef=0.1",
                          "learner.minibatches=2", "engine.logprob_check_every=1")
        batch = Batch([Trajectory(f"{i}", str(i // 4), np.array([5, 6, 7, 8], np.int32),
                                  np.array([9, 10 + i % 3, 11], np.int32),
                                  np.ones(3, np.int8), np.full(3, -3.0, np.float32),
                                  np.zeros(3, np.int32), float(i % 2), "e", "stop")
                       for i in range(16)], 0)
        learner = Learner(cfg, str(model_dir), OneBatch(batch), LocalSync())
        metrics = [learner.step() for _ in range(2)]
        results.append((metrics, [p.detach().clone() for p in learner.model.parameters()]))
    (m_a, p_a), (m_b, p_b) = results
    for key in ("learner/loss", "learner/grad_norm", "kl/ref", "learner/entropy"):
        assert abs(m_a[-1][key] - m_b[-1][key]) < 1e-4 * max(1.0, abs(m_b[-1][key])), key
    assert max((a - b).abs().max().item() for a, b in zip(p_a, p_b)) < 1e-5
