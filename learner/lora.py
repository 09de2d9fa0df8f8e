"""LoRA adapters for the learner (`model.lora`), through peft.

Reads: a base model and, on resume, a saved adapter folder. Writes: adapters (`save_adapter`).

The learner trains only the adapters: AdamW holds state for them alone, and the KL penalty's
reference is the base model with the adapters turned off (`reference_off`), so no second copy
of the weights exists. Actors always get merged weights, W + (alpha / r) B A, under the base
model's own names (`merged_state`): engines load them like any full publish. A checkpoint
holds the merged `model/` folder (loadable as `model.path`, for engines and evaluation) with the
adapter in its `adapter/` subfolder, from which a resumed learner rebuilds base + adapter
(`wrap`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from offpolicy.core.errors import ConfigError


def adapter_beside(model_path: str | Path) -> Path | None:
    """The adapter folder a LoRA learner saved inside its merged model folder, if any."""
    folder = Path(model_path) / "adapter"
    return folder if (folder / "adapter_config.json").is_file() else None


def base_of(model_path: str | Path) -> str:
    """The base model the learner loads: the adapter's own base for a LoRA checkpoint's merged
    folder (resume), else `model_path` itself."""
    adapter = adapter_beside(model_path)
    if adapter is None:
        return str(model_path)
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def wrap(model: torch.nn.Module, lora, model_path: str | Path) -> torch.nn.Module:
    """`model` (the base) with trainable adapters: fresh ones (B = 0, so the policy starts as
    the base), or those saved beside `model_path` by a LoRA checkpoint."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install peft") from None
    adapter = adapter_beside(model_path)
    if adapter is not None:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    targets = lora.target_modules
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"model.lora: {str(e).splitlines()[0]}") from None


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def scoring_module(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model to call: a peft wrapper's base model, whose linear layers carry
    the adapters in place (its forward takes `logits_to_keep` and the cache, the wrapper's
    signature does not)."""
    return model.get_base_model() if is_lora(model) else model


def reference_off(model: torch.nn.Module):
    """A context in which `model` scores as the base model: the adapters turned off."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


@torch.no_grad()
def merged_state(model: torch.nn.Module,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """CPU tensors of the merged weights in `dtype` under the base model's names (the
    adapters' deltas added out of place, in float32: the base weights are never touched, and a
    bf16 base is not rounded twice). Tied weights stay one tensor under both names."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {f"{name}.weight": m.get_delta_weight(m.active_adapters[0])
              for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out, copies = {}, {}
    for k, v in base.state_dict().items():
        if ".lora_" in k:
            continue
        key = k.replace(".base_layer.", ".")
        if key in deltas:  # (the float32 delta takes the base in place: one temporary)
            out[key] = deltas[key].float().add_(v).to("cpu", dtype)
        else:
            if v.data_ptr() not in copies:
                copies[v.data_ptr()] = v.detach().to("cpu", dtype, copy=True)
            out[key] = copies[v.data_ptr()]
    return out


def save(model: torch.nn.Module, path: str) -> None:
    """The merged weights as a Hugging Face folder at `path`, the adapter in `path/adapter`."""
    scoring_module(model).save_pretrained(path, state_dict=merged_state(model))
    model.save_pretrained(f"{path}/adapter")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
