"""Shared fixtures: a small random-weight model folder (no warm-up), the quickstart's base
model, and a fast config. The test process is set up as a role's process would be (offline, one
torch thread: the roles built in-process share it)."""

from pathlib import Path

import pytest
import torch

from offpolicy.core.process import setup_process

setup_process(threads=1)  # before transformers is imported

from offpolicy.buffer.fixed import FixedBatch  # noqa: E402
from offpolicy.models.sources import ensure_base_model  # noqa: E402
from offpolicy.models.tiny import char_tokenizer, tiny_llama  # noqa: E402
from offpolicy.runtime.validate import load_config  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


OneBatch = FixedBatch  # the buffer's stand-in in learner tests: the same batch every step


def fast_config(model_dir, *overrides):
    """A config for seconds-long runs on the random model: small batches, few steps."""
    return load_config(None, [f"model.path={model_dir}", "rollout.prompts_per_batch=4",
                              "rollout.group_size=4", "learner.batch_groups=4",
                              "learner.lr=1e-3", "eval.every=2", "env.eval_size=16",
                              "resources.actor_cpus=0.5", "resources.learner_cpus=0.5",
                              *overrides])


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    cfg = load_config(None, ["model.tiny.hidden_size=32", "model.tiny.num_layers=2",
                             "model.tiny.intermediate_size=64"])
    tok = char_tokenizer()
    torch.manual_seed(0)
    tiny_llama(len(tok), cfg, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def base_model():
    """The quickstart's tiny base model (built once, ~1-2 minutes, then cached)."""
    return ensure_base_model(load_config(QUICKSTART))
