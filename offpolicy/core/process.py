"""The process: settings each process that hosts a role makes once, and the versions it runs.

Reads: the environment. Writes: environment defaults and the torch thread count of the calling
process (`setup_process`), and its garbage collector's state (`built_without_gc`), nothing else.

Nothing here runs on import. Every process that hosts a role calls `setup_process` once, first:
the command line for the driver (and, in the serial layout, for every role, which share its
process), the Ray layout for each role's process (`runtime/ray_roles.py`), a test or benchmark
for itself.
"""

from __future__ import annotations

import gc
import os
import platform
from contextlib import contextmanager

from offpolicy.core.machine import cpu_model

OFFLINE_ENV = {
    # Nothing is downloaded from a model hub at run time; models are built locally or loaded
    # from a path. Quiet the per-file progress bars and the warnings of transformers as well.
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def process_env() -> dict[str, str]:
    """The environment defaults every offpolicy process runs with (`OFFLINE_ENV`), where the
    user has not set them: what `setup_process` sets and the Ray layout hands its workers."""
    return {k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}


def setup_process(threads: int | None = None) -> None:
    """This process's settings, once, before it imports a model library: the environment
    defaults and, when given, the torch thread count (several role processes share the
    machine's cores)."""
    os.environ.update(process_env())
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def built_without_gc():
    """Build a role with Python's cyclic garbage collector paused, then freeze what survived.

    A role's start imports thousands of modules (vLLM, transformers); every 700 new objects the
    collector walks the young ones, and now and then all of them. Paused, the vLLM actor's
    imports and engine build took 6.4-6.8 s against 8.1-8.7 s alone (with `VLLMEngine`'s own
    freeze, below), and SmolLM2's first step came 2-3 s sooner in a run (docs/real_models.md,
    "A fast start"). At the end one collection frees the build's garbage, and `gc.freeze` puts
    the survivors out of later collections' sight. Explicit `gc.collect()` calls run even
    while the collector is paused."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()  # once: the build's own garbage is not frozen for good
        gc.freeze()
        if was_enabled:
            gc.enable()


def environment_info() -> dict:
    """The library versions and CPU that a result was measured with."""
    import numpy as np
    import tokenizers
    import torch
    import transformers

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}
