"""TRL's conventions: `env.dataset` (JSONL, parquet, a saved datasets folder) with a `prompt`
column, scored by a reward function written for TRL's GRPOTrainer, unchanged."""

import json
import textwrap

import pytest

from offpolicy.core.errors import ConfigError
from offpolicy.envs import make_env
from offpolicy.runtime.validate import load_config
from offpolicy.tools.cli import main

# Written as TRL's docs write one: completions are texts, or lists of messages for chat
# prompts; the dataset's other columns arrive as keyword arguments, one entry per completion.
TRL_REWARDS = textwrap.dedent('''
    def exact_answer(completions, answer, **kwargs):
        contents = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(contents, answer)]

    def short(completions, **kwargs):
        return [None if kwargs.get("skip") else -0.01 * len(str(c)) for c in completions]
''')


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(TRL_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["my_rewards.exact_answer", "my_rewards:short"]


def _rows(n: int, chat: bool) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 10, (i * 7) % 10
        q = f"{a}+{b}="
        rows.append({"prompt": [{"role": "user", "content": q}] if chat else q,
                     "answer": str(a + b), "id": i})
    return rows


def test_a_trl_reward_function_scores_chat_and_text_rows(tmp_path, rewards_module):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(40, chat=True)))
    env = make_env("dataset", "train", eval_size=8, path=str(path),
                   reward_funcs=rewards_module, reward_weights=[1.0, 2.0])
    prompt = env.reset(3)
    assert isinstance(prompt, list) and prompt[0]["role"] == "user"
    answer = env.current["answer"]
    _, reward, done, info = env.step(f" {answer}")
    assert done and info["reward/exact_answer"] == 1.0
    assert reward == pytest.approx(1.0 + 2.0 * -0.01 * len(str([{"role": "assistant",
                                                                "content": f" {answer}"}])))
    # the eval split is held out: none of its rows is ever drawn for training
    evals = make_env("dataset", "eval", eval_size=8, path=str(path),
                     reward_funcs=rewards_module)
    held = {json.dumps(evals.rows[i]) for i in range(8)}
    assert len(evals.rows) == 8 and not held & {json.dumps(r) for r in env.rows}


def test_parquet_and_saved_datasets_folders_load_alike(tmp_path, rewards_module):
    datasets = pytest.importorskip("datasets")
    rows = _rows(30, chat=False)
    data = datasets.Dataset.from_list(rows)
    data.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": data, "test": data.select(range(5))}).save_to_disk(
        str(tmp_path / "saved"))
    flat = make_env("dataset", "train", eval_size=5, path=str(tmp_path / "d.parquet"),
                    reward_funcs=rewards_module)
    assert len(flat.rows) == 25 and set(flat.rows[0]) == {"prompt", "answer", "id"}
    split = make_env("dataset", "eval", eval_size=5, path=str(tmp_path / "saved"),
                     reward_funcs=rewards_module)
    assert split.rows == rows[:5]  # a DatasetDict's own test split is the eval set


def test_bad_datasets_and_reward_paths_are_one_line_errors(tmp_path, base_model,
                                                          rewards_module):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(40, chat=False)))
    common = [f"model.path={base_model}", f"env.dataset={path}", "env.eval_size=8"]
    cases = {"env.reward_funcs=[my_rewards.nope]": "'my_rewards.nope' is not a function",
             "env.reward_funcs=[no_such_module.f]": "cannot import 'no_such_module'",
             "env.eval_size=40": "has 40 rows, not more than env.eval_size=40"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*common, "env.reward_funcs=[my_rewards.short]", override])
    with pytest.raises(ConfigError, match="is not a .jsonl or .parquet file"):
        load_config(None, [*common[:1], f"env.dataset={tmp_path}/x.csv",
                           "env.reward_funcs=[my_rewards.short]"])


def test_a_run_trains_on_a_trl_dataset_with_its_reward_function(tmp_path, base_model,
                                                                rewards_module):
    """The quickstart's tiny model on the same sums as a JSONL dataset, scored by the TRL
    reward function: it runs, and the function's reward is what the run reports."""
    addition, path = make_env("addition", "train"), tmp_path / "sums.jsonl"
    rows = [{"prompt": addition.reset(seed), "answer": addition.current["answer"]}
            for seed in range(600)]  # the task's own format: digits reversed
    path.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    assert main(["train", "configs/quickstart.yaml", f"model.path={base_model}",
                 f"env.dataset={path}", "env.reward_funcs=[my_rewards.exact_answer]",
                 "env.eval_size=32", "learner.steps=6", "eval.every=3",
                 "resources.serial=true", f"run.dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert 0.05 < summary["base_eval_reward"] < 0.95  # the model's own skill, by TRL's function
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("rollout/reward_mean", 0) > 0 for m in metrics)
