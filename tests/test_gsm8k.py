"""The GSM8K-format task: file parsing, answer extraction, held-out eval, errors."""

import json

import pytest

from offpolicy.envs import make_env
from offpolicy.envs.gsm8k import final_number, math_reward


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"question": f"Tom has {i} apples and buys {i + 1}. How many?",
             "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1:,}"} for i in range(600, 640)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("text, number", [
    ("so 3 + 4 = 7\n#### 7", 7.0), ("The answer is 1,234.", 1234.0), ("#### -5", -5.0),
    ("first 3 then 12", 12.0), ("no digits", None), ("#### 2.50", 2.5)])
def test_final_number(text, number):
    assert final_number(text) == number


def test_reward_and_held_out_eval(data):
    train = make_env("gsm8k", "train", path=str(data), eval_size=10)
    ev = make_env("gsm8k", "eval", path=str(data), eval_size=10)
    prompt = train.reset(3)
    assert "How many?" in prompt and prompt.endswith("Solution:")
    answer = train.current["answer"]
    assert train.step(f"lots of work\n#### {int(answer)}")[1] == 1.0
    assert train.step(f"#### {int(answer) + 1}")[1] == 0.0
    eval_prompts = {ev.reset(i) for i in range(10)}
    assert len(eval_prompts) == 10
    assert not eval_prompts & {train.reset(s) for s in range(200)}
    assert math_reward("1,241", 1241.0) == 1.0


def test_bad_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no number here"}\n')
    with pytest.raises(ValueError, match="line 1"):
        make_env("gsm8k", path=str(bad))
    with pytest.raises(ValueError, match="no such file"):
        make_env("gsm8k", path=str(tmp_path / "missing.jsonl"))
