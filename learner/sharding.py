"""`learner.sharding: fsdp`: the policy sharded over the learner workers with FSDP2.

Reads: the Learner's model, optimizer and `learner.*` config. Writes: a checkpoint's
`optimizer/` folder (torch.distributed.checkpoint, one file per worker).

Each transformer block, then the root (embeddings, final norm, head), is `fully_shard`-ed over
a one-dimensional mesh of all workers (gloo on CPU, NCCL on GPU): each worker keeps 1/N of
every parameter, its gradient and its AdamW moments. A forward gathers one block's full
parameters at a time and frees them after; a backward reduce-scatters each block's gradients.
The reductions sum (not average): every worker already weights its rows' loss by their share
of the batch's tokens, so the sum is the full-batch gradient, as without sharding.

Every FSDP collective needs every worker, so the functions here run on all ranks at once: the
step (equal numbers of micro-batches per rank), `full_state` (publish and save) and the
optimizer checkpoint. The Learner reaches them through its `Sharded` strategy (parallel.py).
"""

from __future__ import annotations

import datetime
import socket
import warnings

import torch
import torch.distributed as dist

from offpolicy.core.errors import ConfigError


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError:
        return False
    return dist.is_available()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes a Hugging Face model lists in
    `_no_split_modules` (e.g. LlamaDecoderLayer), the unit verl and accelerate shard by."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def check_shardable(model: torch.nn.Module, where: str) -> None:
    if not transformer_blocks(model):
        raise ConfigError(f"learner.sharding=fsdp: no transformer blocks found in {where} "
                          f"({type(model).__name__} lists no _no_split_modules classes that "
                          "it contains); use learner.sharding=none")


def ensure_group(device: torch.device) -> None:
    """A process group of one for a learner that has none (serial mode, one worker)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=600))


def param_dtype(lc, device: torch.device) -> torch.dtype:
    if lc.fsdp_param_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, lc.fsdp_param_dtype)


def shard(model: torch.nn.Module, device: torch.device, lc) -> None:
    """FSDP2 over every worker, in place: blocks first, then the root. Build the optimizer
    after this (it must see the sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                        OffloadPolicy, fully_shard)

    check_shardable(model, "the policy")
    ensure_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = {"mesh": mesh,
               "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype(lc, device),
                                                 reduce_dtype=torch.float32),
               "offload_policy": CPUOffloadPolicy() if lc.fsdp_cpu_offload else OffloadPolicy()}
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: the token shares already weight
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def full_state(model: torch.nn.Module, keep: bool) -> tuple[dict | None, int]:
    """The full weights as CPU tensors (tied ones once, under both names) where `keep`, else
    None; every worker must call it. Parameters are gathered one at a time, so the extra
    memory on the device is one full parameter at most. Returns (state, the largest gathered
    tensor's bytes)."""
    from torch.distributed.tensor import DTensor

    out, copies, peak = {}, {}, 0
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in copies:
            full = value.full_tensor() if isinstance(value, DTensor) else value
            peak = max(peak, full.numel() * full.element_size())
            copies[id(value)] = full.detach().to("cpu", copy=True) if keep else None
            del full
        if keep:
            out[name] = copies[id(value)]
    return (out if keep else None), peak


def save_whole(model: torch.nn.Module, path: str, write: bool) -> None:
    """The full weights, gathered (every worker calls it), as a Hugging Face folder written
    where `write`: an unsharded model of the same config built on the meta device, holding
    the gathered tensors without a copy."""
    from transformers import AutoModelForCausalLM

    state, _ = full_state(model, keep=write)
    if not write:
        return
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    plain.save_pretrained(path)


def save_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: str) -> None:
    """Each worker writes its shard of the AdamW state (all workers call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder)


def load_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: str) -> None:
    """`save_optimizer`'s state into this optimizer, whatever number of workers wrote it and
    however many read it (sharded or not): torch.distributed.checkpoint reshards by each
    tensor's global offsets."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    state = {"optimizer": get_optimizer_state_dict(model, opt)}
    with warnings.catch_warnings():  # alone, DCP warns that it assumes one process: it does
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_optimizer_state_dict(model, opt, state["optimizer"])


def storage_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this worker holds in parameters, gradients and optimizer state (local shards
    only), from the tensors' storage sizes."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def nbytes(tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            t = local(t)
            if t.numel() and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    return {"params": nbytes(params),
            "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for s in opt.state.values() for v in s.values()
                                if torch.is_tensor(v) and v.dim() > 0)}
