"""What a learner step reports, beside the numbers themselves: named timing spans, and the
step's tensors turned into floats with one host sync per device.

Reads: nothing. Writes: nothing; `Learner._metrics` puts both into the step's metrics dict.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


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
