"""The models layer: which base model a run starts from, and how it is loaded.

`sources.py` (`model.path` as a folder, `.gguf`, packaged file or hub id; `ensure_base_model`),
`tiny.py` (the tiny character-level base model, built and cached), `loading.py` (HF loading,
one-line errors, `build_once`), `chat.py` (prompts as text or chat messages). Imports the core,
config, algorithms and envs layers.
"""
