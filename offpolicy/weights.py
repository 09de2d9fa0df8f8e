"""WeightSync: how the learner's weights reach the rollout actors.

Reads/writes: state dicts (name -> CPU tensor) tagged with the policy version.
Protocol: the learner calls `publish(state, version)`; an actor calls `fetch(have_version)` at
a safe point (between batches) and gets `(version, state)` when something newer exists.

- `LocalSync`: in-process, for tests and single-process use.
- `ObjectStoreSync`: the learner `ray.put`s the state once; a tiny `WeightStore` actor holds the
  newest reference; actors pull it from the object store (shared memory on one node).
"""

from __future__ import annotations

from typing import Protocol

import torch


class WeightSync(Protocol):
    def publish(self, state: dict[str, torch.Tensor], version: int) -> None: ...

    def fetch(self, have_version: int) -> tuple[int, dict[str, torch.Tensor]] | None: ...


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's parameters and buffers."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class LocalSync:
    def __init__(self) -> None:
        self.version, self.state = -1, None

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.version, self.state = version, state

    def fetch(self, have_version: int):
        return (self.version, self.state) if self.version > have_version else None


class WeightStore:
    """Holds the newest published object reference (a Ray actor in runs)."""

    def __init__(self) -> None:
        self.version, self.refs = -1, []

    def put(self, version: int, refs: list) -> None:
        # The reference arrives wrapped in a list so Ray passes it through unresolved.
        if version > self.version:
            self.version, self.refs = version, refs

    def latest(self) -> tuple[int, list]:
        return self.version, self.refs


class ObjectStoreSync:
    def __init__(self, store) -> None:
        self.store = store  # a Ray actor handle of WeightStore

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        import ray

        ray.get(self.store.put.remote(version, [ray.put(state)]))

    def fetch(self, have_version: int):
        import ray

        version, refs = ray.get(self.store.latest.remote())
        if version <= have_version:
            return None
        return version, ray.get(refs[0])
