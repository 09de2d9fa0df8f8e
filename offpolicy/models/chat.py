"""Prompts as plain text or as chat messages, and the tokens between the turns of a chat.

Reads: what an environment's `reset` returns (a string, or a list of `{"role", "content"}`
messages) and its observations. Writes: token ids.

A string prompt is tokenized as it is (the tiny model's way). Messages are rendered with the
tokenizer's chat template, generation prompt added, after `env.system_prompt` when one is set
(`env.chat: true` turns a task's string prompt into one user message). In a multi-turn chat
episode an observation becomes a user message (or any `{"role": ..., "content": ...}` the
environment returns, e.g. a tool message); the tokens the template puts between the policy's
completion and the next generation prompt are what `between_turns` returns. They get
loss_mask 0, like the observation itself: the policy did not sample them.
"""

from __future__ import annotations

from offpolicy.core.errors import ConfigError

Messages = list[dict]
_MARK = "\u2063offpolicy-completion\u2063"  # stands in for the completion when rendering


def messages_of(prompt, system_prompt: str = "", chat: bool = False) -> Messages | None:
    """The prompt as chat messages (system prompt first when set), or None for plain text."""
    if isinstance(prompt, str) and not chat:
        return None
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt, messages: Messages | None) -> list[int]:
    """Token ids of a prompt: the text tokenized, or the messages rendered by the template."""
    if messages is None:
        return list(tokenizer(prompt)["input_ids"])
    if not has_template(tokenizer):
        raise ConfigError("env: the prompts are chat messages but the model's tokenizer has no "
                          "chat template; use a chat model or plain-text prompts (env.chat=false)")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def between_turns(tokenizer, history: Messages, observation, eos_sampled: bool) -> list[int]:
    """Token ids after a completion that the chat template puts before the next generation:
    the end of the assistant turn (unless the policy sampled it: `eos_sampled`), the
    observation's message, and the next generation prompt."""
    message = observation if isinstance(observation, dict) else {"role": "user",
                                                                 "content": observation}
    turn = history + [{"role": "assistant", "content": _MARK}]
    before = tokenizer.apply_chat_template(turn, tokenize=False)
    after = tokenizer.apply_chat_template(turn + [message], add_generation_prompt=True,
                                          tokenize=False)
    if not after.startswith(before):
        raise ValueError("multi-turn chat needs a chat template that only appends: rendering "
                         "one more message changed the earlier turns")
    closing = before[before.index(_MARK) + len(_MARK):]
    eos = tokenizer.eos_token or ""
    if eos_sampled and eos and closing.startswith(eos):
        closing = closing[len(eos):]
    return list(tokenizer(closing + after[len(before):], add_special_tokens=False)["input_ids"])
