"""Config: YAML and command-line overrides, one-line errors, docs for every field."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from offpolicy.config.schema import Config
from offpolicy.core.errors import ConfigError
from offpolicy.config.io import field_docs, reference_rows
from offpolicy.runtime.validate import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 1.0e-3\n  steps: 10\nloss:\n  params: {cap: 3}\n")
    cfg = load_config(path, ["learner.lr=5e-4", "rollout.group_size=4", "buffer.max_staleness=2"])
    assert cfg.learner.lr == 5e-4 and cfg.learner.steps == 10
    assert cfg.rollout.group_size == 4 and cfg.loss.params == {"cap": 3}
    assert cfg.run.name == "c"  # from the file name


@pytest.mark.parametrize("override, words", [
    ("learner.nope=1", ["learner.nope", "lr", "steps"]),
    ("nope=1", ["nope", "learner"]),
    ("learner.lr=abc", ["learner.lr", "float"]),
    ("learner.steps=1.5", ["learner.steps", "int"]),
    ("loss.name=foo", ["loss.name", "tis", "pg"]),
    ("engine.name=bar", ["engine.name", "hf"]),
    ("buffer.max_staleness=-1", ["buffer.max_staleness", ">= 0"]),
    ("loss.params.bogus=1", ["loss.params.bogus", "cap"]),
    ("model.path=/does/not/exist", ["model.path", "/does/not/exist"]),
    ("learner", ["learner", "key.sub=value"]),
    ("engine.inflight_updates=true", ["engine.inflight_updates", "vllm"]),
    ("engine.weight_sync=nccl2", ["engine.weight_sync", "filesystem"]),
    ("learner.micro_batch=-1", ["learner.micro_batch", ">= 0"]),
    ("env.kwargs.digits=x", ["env", "addition"]),
    ("env.name=gsm8k", ["env.kwargs.path", "no such file"]),
])
def test_bad_input_names_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "quickstart.yaml", [override])
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_every_field_has_a_docstring():
    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            default = f.default_factory() if callable(f.default_factory) else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default))
    walk(Config)
    keys = [k for k, _, _ in reference_rows()]
    assert "learner.lr" in keys and "model.tiny.hidden_size" in keys


def test_cli_unknown_key_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "offpolicy.tools.cli", "train", str(ROOT / "configs/quickstart.yaml"),
         "learner.nope=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "learner.nope" in lines[0] and "Traceback" not in proc.stderr


def test_env_module_registers_a_user_task(tmp_path, monkeypatch):
    (tmp_path / "my_tasks_for_test.py").write_text(
        "from offpolicy.envs import SingleTurnEnv, register_env\n"
        "register_env('times_test', lambda split='train', eval_size=200: SingleTurnEnv(\n"
        "    'times_test', lambda rng: {'prompt': f'{rng.randrange(9)}*3=', 'answer': '6'},\n"
        "    lambda text, answer: float(text == answer), split=split, eval_size=2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="env.name: unknown 'times_test'"):
        load_config(None, ["env.name=times_test"])
    cfg = load_config(None, ["env.module=my_tasks_for_test", "env.name=times_test"])
    from offpolicy.envs import env_from_config
    env = env_from_config(cfg.env)
    assert env.reset(0).endswith('*3=') and len(env.eval_set) == 2
    assert env.step('6')[1] == float(env.current['answer'] == '6')
    with pytest.raises(ConfigError, match="env.module: cannot import 'no_such_module_x'"):
        load_config(None, ["env.module=no_such_module_x"])


def test_every_loss_takes_its_own_params_and_no_others():
    """For each registered loss: each of its parameters can be set through loss.params (the
    quickstart's file plus overrides), and a key it does not take is a one-line error."""
    import inspect

    from offpolicy.algorithms.losses import LOSSES
    quickstart = ROOT / "configs" / "quickstart.yaml"
    for name, spec in LOSSES.items():
        params = {p.name: p.default for p in inspect.signature(spec.fn).parameters.values()
                  if p.name != "inputs"}
        cfg = load_config(quickstart, [f"loss.name={name}"]
                          + [f"loss.params.{k}={v!r}" for k, v in params.items()])
        assert cfg.loss.name == name and cfg.loss.params == params
        with pytest.raises(ConfigError, match=f"loss.params.not_a_param: not a parameter of "
                                              f"loss '{name}'"):
            load_config(quickstart, [f"loss.name={name}", "loss.params.not_a_param=1"])


def test_rl_seeds_share_one_base_model_and_tiny_seed_changes_it():
    from offpolicy.models.tiny import recipe_key

    base = recipe_key(load_config(None))
    assert recipe_key(load_config(None, ["run.seed=1"])) == base
    assert recipe_key(load_config(None, ["model.tiny.seed=1"])) != base
