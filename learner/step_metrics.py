"""What a learner step reports, beside the numbers themselves: named timing spans, the
step's tensors turned into floats with one host sync per device, and where in their episodes
the stale and off-policy tokens sit (by segment position, in quarters).

Reads: nothing. Writes: nothing; `Learner._metrics` puts both into the step's metrics dict.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from offpolicy.algorithms.losses import LossInputs, importance_diagnostics
from offpolicy.core.types import Batch, PaddedBatch


class Spans:
    """Named timing spans of one step, side by side (none inside another): `time/<name>_s`,
    and `time/update_s`, their sum after the wait."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}_s": v for k, v in self.seconds.items()}
        out["time/update_s"] = sum(v for k, v in self.seconds.items() if k != "wait")
        out.setdefault("time/publish_s", 0.0)
        return out


def to_numbers(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors to floats with one device-to-host copy per device."""
    out: dict[str, float] = {}
    by_device: dict[torch.device, list[str]] = {}
    for k, v in tensors.items():
        by_device.setdefault(v.device, []).append(k)
    for names in by_device.values():
        values = torch.stack([tensors[k].detach().double().reshape(()) for k in names])
        out.update(zip(names, values.cpu().tolist()))
    return out


def segment_quarters(batch: Batch) -> torch.Tensor | None:
    """(B,) which quarter of its episode each row's segment sits in (0 first .. 3 last; -1 for
    a row that is a whole episode); None when no row is one segment of several."""
    seg = torch.tensor([t.segment for t in batch.trajectories])
    n = torch.tensor([t.segments for t in batch.trajectories])
    if not bool((n > 1).any()):
        return None
    return torch.where(n > 1, (4 * seg) // n, -1).clamp(max=3)


def staleness_by_position(batch: Batch, d: PaddedBatch) -> dict[str, torch.Tensor]:
    """Mean staleness of the policy tokens of multi-segment episodes by where their segment
    sits in its episode (`staleness/segment_q1` first .. `q4` last); {} when the batch has no
    such rows."""
    quarter = segment_quarters(batch)
    if quarter is None:
        return {}
    stale = ((batch.version - d.versions) * d.loss_mask).sum(1).double()           # (B,)
    tokens = d.loss_mask.sum(1).double()
    return {f"staleness/segment_q{q + 1}": stale[quarter == q].sum()
            / tokens[quarter == q].sum().clamp(min=1) for q in range(4)}


@torch.no_grad()
def importance_by_position(batch: Batch, d: PaddedBatch, logprobs: torch.Tensor,
                           adv: torch.Tensor, loss, loss_params: dict) -> dict[str, torch.Tensor]:
    """The `is/` diagnostics of each quarter's rows (`is/ess_frac_q1`, `is/kl_k3_q1`,
    `is/clip_frac_q1` .. `q4`): the ratio pi/mu of the step's log-probs `logprobs` (B, T), and
    the loss's own clip fraction on them (`adv` (B,)). {} without multi-segment rows."""
    quarter = segment_quarters(batch)
    if quarter is None:
        return {}
    out = {}
    for q in range(4):
        rows = (quarter == q).nonzero().flatten()
        if not len(rows):
            continue
        c, lp = d.rows(rows), logprobs[rows]
        diag = importance_diagnostics(lp, c.behavior_logprobs, c.loss_mask)
        prox = lp if c.proximal_logprobs is None else c.proximal_logprobs
        _, m = loss(LossInputs(logprobs=lp, behavior_logprobs=c.behavior_logprobs,
                               advantages=adv[rows, None].expand_as(lp), mask=c.loss_mask,
                               proximal_logprobs=prox, row_weights=c.row_weights), **loss_params)
        out[f"is/ess_frac_q{q + 1}"] = diag["is/ess_frac"]
        out[f"is/kl_k3_q{q + 1}"] = diag["is/kl_k3"]
        if "is/clip_frac" in m:
            out[f"is/clip_frac_q{q + 1}"] = m["is/clip_frac"]
    return out
