"""Bad input exits 2 with one line naming the problem, never a traceback (the table in docs/reliability.md)."""

import shutil
import socket

import pytest

from offpolicy.tools.cli import main
from offpolicy.models.tiny import char_tokenizer

from conftest import QUICKSTART


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _mismatched_model(model_dir, tmp_path):
    """The model folder with a tokenizer of 300 tokens beside a 100-token embedding."""
    folder = tmp_path / "mismatch"
    shutil.copytree(model_dir, folder)
    tok = char_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(300 - len(tok))])
    tok.save_pretrained(folder)
    return folder


CASES = {  # name: (overrides, what the one line must say)
    "unknown key": (["learner.nope=1"], "unknown config key 'learner.nope'; valid keys in learner"),
    "wrong type": (["learner.lr=fast"], "learner.lr: expected float, got 'fast'"),
    "missing model path": (["model.path=/no/such/model"], "model.path: no such folder"),
    "tokenizer/model mismatch": ([], "tokenizer and model do not match"),
    "max_staleness < 0": (["buffer.max_staleness=-1"], "buffer.max_staleness: must be >= 0"),
    "empty dataset": (["env.name=gsm8k", "env.kwargs.path=EMPTY"], "holds no problems"),
    "unreachable cluster": (["cluster.address=127.0.0.1:PORT"], "cannot reach a Ray cluster"),
    "bad choice": (["engine.weight_sync=tgi"], "engine.weight_sync: 'tgi' is not a valid choice; "
                   "valid: auto, object_store, filesystem, nccl"),
    "unknown engine": (["engine.name=tgi"], "engine.name: unknown 'tgi'; valid: fake, hf, vllm"),
    "no group can carry signal": (["rollout.group_size=1"],
                                  "rollout.group_size: 1 with buffer.drop_uniform_groups"),
    "one-sample groups, group-relative advantage": (
        ["rollout.group_size=1", "buffer.drop_uniform_groups=false"],
        "rollout.group_size: 1 with learner.advantage=grpo gives every sample advantage 0"),
    "run folder cannot be created": (["run.dir=/proc/offpolicy-run"],
                                     "run.dir: cannot create or write /proc/offpolicy-run"),
    "negative KL coefficient": (["loss.kl_coef=-0.1"], "loss.kl_coef: must be >= 0"),
    "more CPUs than the private Ray has": (["resources.actor_cpus=1000"], "CPU (Ray has "),
    "a base model build that never gets usable": (
        ["model.cache_dir=CACHE", "model.tiny.sft_max_steps=20", "model.tiny.sft_check_every=10"],
        "tiny base model build failed: probe greedy accuracy 0.00 after 20 supervised steps is "
        "outside model.tiny.base_accuracy [0.1, 0.5]"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, model_dir, tmp_path, capsys):
    overrides, message = CASES[case]
    (tmp_path / "empty.jsonl").write_text("")
    overrides = [o.replace("EMPTY", str(tmp_path / "empty.jsonl"))
                 .replace("PORT", str(_closed_port()))
                 .replace("CACHE", str(tmp_path / "cache")) for o in overrides]
    if case == "tokenizer/model mismatch":
        overrides.append(f"model.path={_mismatched_model(model_dir, tmp_path)}")
    assert main(["train", str(QUICKSTART), f"run.dir={tmp_path / 'run'}", *overrides]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("offpolicy: error: ") and out.err.count("\n") == 1, out.err
    assert message in out.err and "Traceback" not in out.out + out.err
