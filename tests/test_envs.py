"""Built-in environments (guess, math, reasoning_gym), warm-up demonstrations, multi-turn greedy
evaluation and the environment step pool. No Ray, no trained model."""

import json
import threading
import time

import pytest
import torch

from offpolicy.runtime.validate import load_config
from offpolicy.envs import ENVS, make_env, register_env
from offpolicy.models.tiny import char_tokenizer, demo_batch, evaluate


def play(env, guesses):
    """Feed guesses until done; returns [(observation, reward, done)]."""
    out = []
    for g in guesses:
        obs, reward, done, _ = env.step(str(g))
        out.append((obs, reward, done))
        if done:
            break
    return out


def test_guess_gives_higher_lower_feedback_and_rewards_only_the_find():
    env = make_env("guess", "eval", n=16, guesses=4)
    assert env.reset(6) == "?0-15:"  # the eval split plays number seed % n
    assert play(env, [8, 4, 6]) == [("<", 0.0, False), (">", 0.0, False), (None, 1.0, True)]
    env.reset(6)
    assert play(env, [0, 1, 2, 3, 4]) == [(">", 0.0, False)] * 3 + [(None, 0.0, True)]
    env.reset(6)
    assert env.step("six")[1:3] == (0.0, True)  # not a number: the episode ends unrewarded
    env = make_env("guess", "eval", n=16, guesses=4, step_cost=0.1)
    env.reset(6)
    assert [r for _, r, _ in play(env, [8, 6])] == [-0.1, 1.0]  # a per-turn reward
    with pytest.raises(ValueError, match="n >= 2"):
        make_env("guess", n=1)


def test_guess_demonstrations_respect_the_feedback():
    """Halving (right) and scanning from the bottom (flawed) both only guess numbers the feedback
    leaves possible; halving finds 15 of 16 numbers in 4 guesses, the scan 4 of 16."""
    env = make_env("guess", "eval", n=16, guesses=4)
    found = {False: 0, True: 0}
    for seed in range(16):
        for flawed in found:
            env.reset(seed)
            pieces = env.demonstration(flawed=flawed)
            assert [policy for _, policy in pieces] == [k % 2 == 0 for k in range(len(pieces))]
            lo, hi = 0, 15
            for guess, obs in zip(pieces[0::2], pieces[1::2] + [(None, False)]):
                g = int(guess[0])
                assert lo <= g <= hi  # never a number the feedback already ruled out
                assert g == (lo if flawed else (lo + hi) // 2)
                if obs[0] == "<":
                    hi = g - 1
                elif obs[0] == ">":
                    lo = g + 1
            assert len(pieces[0::2]) <= 4
            found[flawed] += int(pieces[-1][0]) == env.secret  # the last piece is a guess
    assert found == {False: 15, True: 4}


def test_demo_batch_labels_only_the_policy_tokens():
    tok = char_tokenizer()
    env = make_env("guess", "train", n=16, guesses=4)
    env.reset(3)
    pieces = env.demonstration()
    ids, labels = demo_batch(tok, env, [3])
    text = tok.decode(ids[0][labels[0] != -100])
    assert text == "<eos>".join(p for p, policy in pieces if policy) + "<eos>"
    # prompt, then every piece in order, with end-of-sequence after each policy turn
    whole = "?0-15:" + "".join(p + ("<eos>" if policy else "") for p, policy in pieces)
    assert tok.decode(ids[0], skip_special_tokens=False) == "<bos>" + whole


class _Scripted(torch.nn.Module):
    """A stand-in model whose greedy completion is always `text`; records what it was shown."""

    def __init__(self, tok, text):
        super().__init__()
        self.reply = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        self.seen, self.tok = [], tok
        self.device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, **kw):
        self.seen.append([self.tok.decode(row[m.bool()].tolist())
                          for row, m in zip(input_ids, attention_mask)])
        reply = torch.tensor([self.reply] * len(input_ids))
        return torch.cat([input_ids, reply], dim=1)


def test_greedy_evaluation_plays_multi_turn_episodes():
    tok = char_tokenizer()
    env_cfg = load_config(None, ["env.name=guess", "env.kwargs={n: 8, guesses: 3}",
                                 "env.max_turns=3"]).env
    model = _Scripted(tok, "5")  # always guesses 5: found only when the number is 5
    assert evaluate(model, tok, env_cfg, list(range(8)), max_new_tokens=2) == 1 / 8
    assert len(model.seen) == 3  # numbers other than 5 go on for all three turns
    assert model.seen[1][3] == "<bos>?0-7:5<eos><"  # the observation follows the completion
    assert model.seen[2][6] == "<bos>?0-7:5<eos>>5<eos>>"
    env_cfg.max_turns = 2  # the turn limit applies to evaluation too
    model = _Scripted(tok, "5")
    evaluate(model, tok, env_cfg, list(range(8)), max_new_tokens=2)
    assert len(model.seen) == 2


def test_evaluation_contains_an_environment_that_raises():
    class Broken:
        def __init__(self, split="train", eval_size=0):
            pass

        def reset(self, seed):
            return "1+1="

        def step(self, text):
            raise RuntimeError("reward function broke")

    register_env("broken", Broken)
    try:
        env_cfg = load_config(None, ["env.name=broken"]).env
        assert evaluate(_Scripted(char_tokenizer(), "2"), char_tokenizer(), env_cfg, [0, 1], 2) == 0
    finally:
        ENVS.pop("broken", None)


def test_math_env_grades_with_math_verify(tmp_path):
    env = make_env("math", "train")
    prompt = env.reset(1)
    answer = env.current["answer"]
    assert prompt.endswith("=") and str(eval(prompt[:-1])) == answer
    for text, want in [(answer, 1.0), (f"The answer is ${answer}$.", 1.0),
                       (f"\\boxed{{{answer}}}", 1.0), (str(int(answer) + 1), 0.0), ("", 0.0)]:
        assert env.step(text)[1] == want, text
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "Half of one?", "answer": "\\frac{1}{2}"}) + "\n"
                    + json.dumps({"question": "Two plus two?", "answer": 4}) + "\n")
    env = make_env("math", "train", path=str(path), eval_size=1)
    seen = {env.reset(s): env.current["answer"] for s in range(20)}
    assert len(seen) == 1  # the other problem is the held-out eval problem
    q, a = next(iter(seen.items()))
    env.reset(0)
    right = "0.5" if a == "\\frac{1}{2}" else "4.0"
    assert env.step(right)[1] == 1.0  # equal values in other forms count
    # off the main thread (the actor's environment threads) it still grades
    got = []
    t = threading.Thread(target=lambda: got.append(env.step(right)[1]))
    t.start()
    t.join()
    assert got == [1.0]
    for bad, msg in [("missing.jsonl", "no such file"), (str(tmp_path / "bad.jsonl"), "line 1")]:
        (tmp_path / "bad.jsonl").write_text("{not json\n")
        with pytest.raises(ValueError, match=msg):
            make_env("math", path=bad)


def test_reasoning_gym_adapter_wraps_any_dataset_by_name():
    env = make_env("reasoning_gym", "train", dataset="basic_arithmetic", eval_size=20)
    prompt = env.reset(5)
    entry = env.current["answer"]
    assert entry["question"] in prompt and prompt.endswith("Answer:")
    assert env.step(f" {entry['answer']}\n")[1] == 1.0
    assert env.step("not a number")[1] == 0.0
    ev = make_env("reasoning_gym", "eval", dataset="basic_arithmetic", eval_size=20)
    held_out = {ev.reset(i) for i in range(20)}
    assert len(held_out) == 20 and not held_out & {env.reset(s) for s in range(300)}
    assert make_env("reasoning_gym", dataset="leg_counting", eval_size=5).reset(0)
    for kwargs, msg in [({"dataset": "nope"}, "unknown reasoning-gym dataset 'nope'"),
                        ({}, "name a reasoning-gym dataset"),
                        ({"dataset": "leg_counting", "bogus": 1}, "rejects")]:
        with pytest.raises(ValueError, match=msg):
            make_env("reasoning_gym", **kwargs)


def test_step_pool_reuses_threads_and_survives_a_hung_step():
    from offpolicy.actors.episodes import StepPool as _StepPool

    pool = _StepPool()
    release = threading.Event()
    hung = pool.submit(release.wait)  # holds its thread until released
    def step_threads():  # the pool's own threads; other threads of the process may come and go
        return sum(t.name == "env-step" for t in threading.enumerate())

    before = step_threads()
    for _ in range(5):  # five rounds of 20 steps: threads are reused, not started per step
        futs = [pool.submit(lambda k=k: k * k) for k in range(20)]
        assert [f.result(timeout=5) for f in futs] == [k * k for k in range(20)]
    assert step_threads() - before <= 20
    assert not hung.done()
    release.set()
    assert hung.result(timeout=5) is True
    t0 = time.perf_counter()
    assert pool.submit(lambda: 7).result(timeout=5) == 7 and time.perf_counter() - t0 < 1


def test_addition_flawed_demonstration_drops_every_carry():
    from offpolicy.envs import make_env

    env = make_env("addition")
    seen = {True: 0, False: 0}
    for seed in range(200):
        prompt = env.reset(seed)
        a, b = (int(x) for x in prompt[:-1].split("+"))
        right, flawed = env.demonstration()[0][0], env.demonstration(flawed=True)[0][0]
        no_carry = (a % 10 + b % 10 < 10) and (a // 10 + b // 10 < 10)
        assert right == f"{a + b:03d}"[::-1] and len(flawed) == 3
        assert (flawed == right) == no_carry  # the mistake shows exactly where a carry is due
        assert flawed == f"{(a % 10 + b % 10) % 10 + 10 * ((a // 10 + b // 10) % 10):03d}"[::-1]
        seen[no_carry] += 1
    assert min(seen.values()) > 40  # both kinds of problem occur
    assert env.step(flawed)[1] == float(no_carry)
    from offpolicy.models.tiny import _has_flawed

    assert _has_flawed(env) and _has_flawed(make_env("guess"))

    class NoMistake:  # a task of one's own without a flawed demonstration: the old stop rule
        def demonstration(self):
            return [("1", True)]

    assert not _has_flawed(NoMistake())
