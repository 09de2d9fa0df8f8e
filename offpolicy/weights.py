"""WeightSync: how the learner's weights reach the rollout actors.

Reads/writes: state dicts (name -> CPU tensor) tagged with the policy version.
Protocol: the learner calls `publish(state, version)`; an actor calls `fetch(have_version)` at
a safe point (between batches, or between engine steps with in-flight updates) and gets
`(version, source)` when something newer exists; `source` is what the engine's `load_weights`
takes: a state dict, or a folder holding `model.safetensors`.

- `LocalSync`: in-process, for tests and single-process use.
- `ObjectStoreSync`: the learner `ray.put`s the state once; a tiny `WeightStore` actor holds the
  newest reference; actors pull it from the object store (shared memory on one node).
- `FileSync`: the learner writes `<root>/v<version>/model.safetensors` (atomic rename) and the
  `WeightStore` holds the newest folder; the vLLM engine reloads from it in place
  (`reload_weights`). Needs a filesystem the learner and actors share.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file


class WeightSync(Protocol):
    def publish(self, state: dict[str, torch.Tensor], version: int) -> None: ...

    def fetch(self, have_version: int) -> tuple[int, dict[str, torch.Tensor]] | None: ...


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's parameters and buffers. Tied weights (input and
    output embeddings) stay one tensor under both names, so they are copied and sent once."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if key not in copies:
            copies[key] = v.detach().to("cpu", copy=True)
        out[k] = copies[key]
    return out


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


class FileSync:
    """Weights through a shared folder; keeps the newest `keep` versions on disk.

    Few versions are kept because a fresh folder costs fresh memory (page cache), which is what
    makes a write slow; an actor that finds its folder already gone fetches the newer one.
    """

    def __init__(self, store, root: str | Path, keep: int = 3) -> None:
        self.store, self.root, self.keep = store, Path(root), keep  # store: WeightStore (actor)
        self._cleaner: threading.Thread | None = None

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        final = self.root / f"v{version:08d}"
        tmp = self.root / f".tmp-v{version:08d}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        # Every name is written, tied ones too: vLLM's in-place reload needs both embedding
        # names. safetensors refuses shared memory, so a repeated tensor is written as a copy.
        seen: set[int] = set()
        tensors = {k: (v.clone() if id(v) in seen or seen.add(id(v)) else v.contiguous())
                   for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        if final.exists():  # a resumed run republishing a version
            shutil.rmtree(final)
        tmp.rename(final)  # readers only ever see complete folders
        self.store.put(version, [str(final)])
        # Deleting a big file takes as long as writing it: off the publish path.
        if self._cleaner is not None:
            self._cleaner.join()
        old = sorted(self.root.glob("v*"))[:-self.keep]
        self._cleaner = threading.Thread(
            target=lambda: [shutil.rmtree(d, ignore_errors=True) for d in old], daemon=True)
        self._cleaner.start()

    def fetch(self, have_version: int):
        version, paths = self.store.latest()
        return (version, paths[0]) if version > have_version else None
