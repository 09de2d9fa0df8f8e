"""WeightSync: how the learner's weights reach the rollout actors.

Reads/writes: state dicts (name -> CPU tensor) tagged with the policy version.
Protocol (`WeightSync`): the learner calls `connect(model)` once and `publish(state, version)`
after updates; an actor calls `fetch(have_version)` at a safe point (between batches, or
between engine steps with in-flight updates) and gets `(version, source)` when something newer
exists, or `fetch(have_version, want=v)` for exactly version v (lag mode); `source` is what the
engine's `load_weights` takes: a state dict, or a folder holding `model.safetensors`.

- `LocalSync`: in-process, for tests and the serial layout.
- `ObjectStoreSync`: the learner `ray.put`s the state once; a tiny `WeightStore` actor holds the
  newest reference; actors pull it from the object store (shared memory on one node).
- `FileSync`: the learner writes `<root>/v<version>/model.safetensors` (atomic rename) and the
  `WeightStore` holds the newest folder; the vLLM engine reloads from it in place
  (`reload_weights`). Needs a filesystem the learner and actors share.
- `NCCLSync` (GPU): the learner broadcasts into the actors' running vLLM engines.

Every sync that talks to the `WeightStore` actor takes it as a `Remote` (calls look local), so
the store has one calling convention; only ObjectStoreSync itself touches Ray (`ray.put`).
`WEIGHT_SYNCS` maps `engine.weight_sync` (resolved in the run plan) to the class; the Ray layout
builds the run's sync with `build(cfg, plan, store, folder)` and reads what it needs of the
wiring off the class (`pushes`, `uses_folder`).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from offpolicy.config.plan import RunPlan
from offpolicy.config.schema import Config
from offpolicy.core.registry import Registry
from offpolicy.weights.store import WeightStore


class WeightSync(Protocol):
    needs_cpu_state: bool
    """Whether `publish` needs a CPU state dict (False: it reads the model itself, NCCL)."""
    pushes: bool
    """Whether weights are pushed into running actors (NCCL): each actor then takes calls on a
    second thread, and the sync is `attach`ed to the actors."""
    uses_folder: bool
    """Whether published weights are files under `engine.weights_dir` (room is checked first)."""

    def connect(self, model: torch.nn.Module) -> None:
        """Called once by the learner (rank 0) with its model, before the first publish."""
        ...

    def publish(self, state: dict[str, torch.Tensor] | None, version: int) -> None: ...

    def fetch(self, have_version: int, want: int | None = None) -> tuple[int, Any] | None: ...

    def vanished(self, source: Any) -> bool:
        """Whether a fetched `source` is gone (a sync that keeps few versions dropped it since
        the fetch): the actor then fetches again."""
        ...


class _PullSync:
    """What the pull-based syncs share: nothing to connect, a CPU state to publish, sources
    that never vanish."""

    needs_cpu_state, pushes, uses_folder = True, False, False

    def connect(self, model: torch.nn.Module) -> None:
        pass

    def vanished(self, source: Any) -> bool:
        return False


def cpu_state(model: torch.nn.Module,
              dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's parameters and buffers, floating ones cast to `dtype`
    in the same copy when given. Tied weights (input and output embeddings) stay one tensor
    under both names, so they are copied and sent once."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if key not in copies:
            copies[key] = v.detach().to("cpu", dtype=dtype if v.is_floating_point() else None,
                                        copy=True)
        out[k] = copies[key]
    return out


def to_bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors cast to bfloat16; tied tensors stay one tensor under both names."""
    done: dict[int, torch.Tensor] = {}
    for v in state.values():
        if id(v) not in done:
            done[id(v)] = v.to(torch.bfloat16) if v.is_floating_point() else v
    return {k: done[id(v)] for k, v in state.items()}


class LocalSync(_PullSync):
    """In-process: the learner and actor share this object (tests, serial use)."""

    def __init__(self, keep: int = 1) -> None:
        self.store = WeightStore(keep)

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.store.put(version, [state])

    def fetch(self, have_version: int, want: int | None = None):
        got = self.store.pick(have_version, want)
        return None if got is None else (got[0], got[1][0])

    @property
    def version(self) -> int:
        return self.store.latest()[0]


class ObjectStoreSync(_PullSync):
    """State dicts go through the object store as numpy arrays: Ray stores those without
    pickling and actors read them from shared memory in place (torch tensors would be pickled
    by torch on publish and unpickled by every reader, about 12% of a tiny-model run's CPU)."""

    def __init__(self, store) -> None:
        self.store = store  # the WeightStore actor (a Remote)

    @classmethod
    def build(cls, cfg: Config, plan: RunPlan, store, folder: Path) -> "ObjectStoreSync":
        return cls(store)

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        import ray

        # The reference is passed inside a list, so Ray hands it over as a reference.
        self.store.put(version, [ray.put(to_numpy(state))])

    def fetch(self, have_version: int, want: int | None = None):
        import ray

        got = self.store.pick(have_version, want)
        return None if got is None else (got[0], from_numpy(ray.get(got[1][0])))


# numpy has no bfloat16 or float8: those travel as same-width integers and are viewed back
_AS_INT = {2: torch.int16, 1: torch.int8}


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (array, torch dtype name); tied tensors become one array under both names."""
    out, seen = {}, {}
    for k, v in state.items():
        if id(v) not in seen:
            t = v.detach().cpu().contiguous()
            if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
                t = t.view(_AS_INT[t.element_size()])
            seen[id(v)] = (t.numpy(), str(v.dtype).removeprefix("torch."))
        out[k] = seen[id(v)]
    return out


def from_numpy(arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    """The inverse of `to_numpy`. Arrays read from the object store are read-only; the
    tensors share their memory and are only read (`load_state_dict` copies them)."""
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, (a, dtype) in arrays.items():
            t = torch.from_numpy(a)
            want = getattr(torch, dtype)
            out[k] = t.view(want) if t.dtype != want else t
    return out


class FileSync(_PullSync):
    """Weights through a shared folder; keeps the newest `keep` versions on disk.

    Few versions are kept because a fresh folder costs fresh memory (page cache), which is what
    makes a write slow. With `recycle` (one machine) the folder that falls out of the newest
    `keep` is renamed and its file overwritten in place for the next version, so no new memory
    is taken: a bf16 SmolLM2 publish beside vLLM took 0.22-0.26 s, not 0.5-1.06 s. An actor
    that finds its folder gone, before or after reading it, fetches the newer one (`vanished`).
    """

    uses_folder = True

    def __init__(self, store, root: str | Path, keep: int = 3, recycle: bool = False) -> None:
        self.store, self.root, self.keep = store, Path(root), keep  # the WeightStore (Remote)
        self.recycle = recycle
        self._cleaner: threading.Thread | None = None

    @classmethod
    def build(cls, cfg: Config, plan: RunPlan, store, folder: Path) -> "FileSync":
        # Only with a private Ray (one machine): on a cluster another node may see the rename
        # late (NFS caches attributes), and a read overlapping the rewrite would go unnoticed.
        private = not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
        return cls(store, folder, keep=plan.file_versions, recycle=private)

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        final = self.root / f"v{version:08d}"
        tmp = self.root / f".tmp-v{version:08d}-{os.getpid()}"
        if self._cleaner is not None:
            self._cleaner.join()
        old = sorted(self.root.glob("v*"))
        if not (self.recycle and len(old) >= self.keep and rewrite(old[0], tmp, state)):
            tmp.mkdir(parents=True, exist_ok=True)
            # Every name is written, tied ones too: vLLM's in-place reload needs both
            # embedding names. safetensors refuses shared memory: a repeat is written as a copy.
            seen: set[int] = set()
            tensors = {k: (v.clone() if id(v) in seen or seen.add(id(v)) else v.contiguous())
                       for k, v in state.items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE))
        if final.exists():  # a resumed run republishing a version
            shutil.rmtree(final)
        tmp.rename(final)  # readers only ever see complete folders
        self.store.put(version, [str(final)])
        # Deleting a big file takes as long as writing it: off the publish path.
        old = sorted(self.root.glob("v*"))[:-self.keep]
        self._cleaner = threading.Thread(
            target=lambda: [shutil.rmtree(d, ignore_errors=True) for d in old], daemon=True)
        self._cleaner.start()

    def fetch(self, have_version: int, want: int | None = None):
        got = self.store.pick(have_version, want)
        return None if got is None else (got[0], got[1][0])

    def vanished(self, source: Any) -> bool:
        return not Path(source).exists()


WEIGHTS_FILE = "model.safetensors"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
                       torch.bool: "BOOL"}


def rewrite(folder: Path, tmp: Path, state: dict[str, torch.Tensor]) -> bool:
    """Move `folder` to `tmp` and overwrite its safetensors file with `state` in place, when the
    file holds exactly the same names, dtypes and shapes (else False and nothing is touched).
    The rename comes first, so a reader that checks the folder after its read knows whether it
    could have overlapped the writes."""
    path = folder / WEIGHTS_FILE
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    header.pop("__metadata__", None)
    if header.keys() != state.keys() or any(
            header[k]["dtype"] != _SAFETENSORS_DTYPES.get(v.dtype) or
            header[k]["shape"] != list(v.shape) for k, v in state.items()):
        return False
    folder.rename(tmp)
    with open(tmp / WEIGHTS_FILE, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        data = torch.frombuffer(mm, dtype=torch.uint8)
        for k, v in state.items():
            a, b = header[k]["data_offsets"]
            data[8 + size + a:8 + size + b].view(v.dtype).view(v.shape).copy_(v)
        del data  # the map closes only once no tensor holds it
    return True


class NCCLSync:
    """GPU only: the learner broadcasts its parameters straight into every actor's running vLLM
    over NCCL (vLLM's weight-transfer API, backend `nccl`); nothing goes through the CPU.

    The learner process is NCCL rank 0; actor i's vLLM workers are ranks 1 + i * tp ... .
    vLLM's trainer engine drives each update as start -> update (during the broadcast) ->
    finish; the calls reach the actors through `RolloutActor.weight_rpc`, whose engine holds
    its step lock from start to finish so no token is sampled with half-loaded weights or a stale
    version tag. Actors never pull (`fetch` returns None): weights are pushed.
    Not exercised on CPU (no NCCL there); `filesystem` is the same protocol on a CPU.
    """

    needs_cpu_state = False  # the broadcast reads the learner's GPU parameters directly
    pushes, uses_folder = True, False

    def __init__(self, store, tp: int = 1) -> None:
        self.store, self.tp = store, tp  # the WeightStore (Remote)
        self.actors: list = []           # the rollout actors' handles (`attach`)
        self.engine, self.version = None, 0

    @classmethod
    def build(cls, cfg: Config, plan: RunPlan, store, folder: Path) -> "NCCLSync":
        return cls(store, tp=cfg.engine.vllm_args.get("tensor_parallel_size", 1))

    def attach(self, actors: list) -> None:
        """The rollout actors to push into (their handles exist only after they are created
        with this sync; the learner gets it after this call)."""
        self.actors = list(actors)

    def vanished(self, source: Any) -> bool:
        return False

    def connect(self, model: torch.nn.Module) -> None:
        """Rendezvous with every actor's workers (called by the learner once, on its GPU)."""
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine)
        from vllm.utils.network_utils import get_ip, get_open_port

        info = NCCLTrainerInitInfo(master_address=get_ip(), master_port=get_open_port(),
                                   world_size=1 + len(self.actors) * self.tp, rank=0)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=_ActorsClient(self), source=ModuleSource(model))

    def publish(self, state, version: int) -> None:
        self.version = version  # read by _ActorsClient.finish_weight_update
        self.engine.send_weights()
        self.store.put(version, [])

    def fetch(self, have_version: int, want: int | None = None):
        return None


class _ActorsClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our rollout actors (Ray handles)."""

    def __init__(self, sync: NCCLSync) -> None:
        self.sync = sync

    def _all(self, method: str, args: list) -> None:
        import ray

        ray.get([a.weight_rpc.remote(method, *arg) for a, arg in zip(self.sync.actors, args)])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        # vLLM's trainer engine puts every worker at rank_offset 1; each actor is its own vLLM
        # instance, so actor i starts after the i * tp ranks of the actors before it.
        self._all("init_weight_transfer_engine",
                  [({**init_info, "rank_offset": 1 + i * self.sync.tp},)
                   for i in range(len(self.sync.actors))])

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [()] * len(self.sync.actors))

    def update_weights(self, update_info) -> None:
        self._all("update_weights", [(update_info,)] * len(self.sync.actors))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", [(self.sync.version,)] * len(self.sync.actors))

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine", [()] * len(self.sync.actors))


WEIGHT_SYNCS: Registry[type] = Registry("engine.weight_sync")
"""The kinds a run can use between processes (the serial layout shares a `LocalSync`)."""
WEIGHT_SYNCS.register("object_store", ObjectStoreSync)
WEIGHT_SYNCS.register("filesystem", FileSync)
WEIGHT_SYNCS.register("nccl", NCCLSync)
