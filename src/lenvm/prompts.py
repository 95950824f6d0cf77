"""Prompts: reading prompt files and turning a prompt into the generator's token ids."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from lenvm.io import InputError, iter_jsonl

Messages = list[dict[str, str]]
TokenIds = list[int]


@dataclass
class Prompt:
    """One prompt: plain text or chat messages, with an id that names it in output files."""

    id: str
    text: str | None = None
    messages: Messages | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_messages(self) -> Messages:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.text}]

    def to_json(self) -> str | Messages:
        return self.messages if self.messages is not None else self.text


def prompt_from_record(record: dict[str, Any], default_id: str, where: str = "") -> Prompt:
    """Build a :class:`Prompt` from ``{"prompt": ...}`` or ``{"messages": [...]}``."""
    where = f"{where}: " if where else ""
    pid = str(record.get("id", default_id))
    extra = {k: v for k, v in record.items() if k not in ("id", "prompt", "messages")}
    if "messages" in record:
        messages = record["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise InputError(f"{where}'messages' must be a non-empty list of {{role, content}} strings")
        if not any(m["content"].strip() for m in messages):
            raise InputError(f"{where}the prompt is empty")
        return Prompt(pid, messages=messages, extra=extra)
    text = record.get("prompt")
    if not isinstance(text, str):
        raise InputError(f"{where}expected a 'prompt' string or a 'messages' list")
    if not text.strip():
        raise InputError(f"{where}the prompt is empty")
    return Prompt(pid, text=text, extra=extra)


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a prompts JSONL file; ids default to the line's position; duplicate ids are an error."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for index, record in enumerate(iter_jsonl(path)):
        prompt = prompt_from_record(record, default_id=str(index), where=f"{path}: record {index + 1}")
        if prompt.id in seen:
            raise InputError(f"{path}: duplicate prompt id {prompt.id!r}")
        seen.add(prompt.id)
        prompts.append(prompt)
    if not prompts:
        raise InputError(f"{path}: no prompts in file")
    return prompts


def as_prompt(prompt: str | Messages | Prompt, default_id: str = "0") -> Prompt:
    """Accept a string, a message list or a :class:`Prompt`."""
    if isinstance(prompt, Prompt):
        return prompt
    if isinstance(prompt, str):
        return prompt_from_record({"prompt": prompt}, default_id)
    return prompt_from_record({"messages": prompt}, default_id)


def is_token_ids(prompt: object) -> bool:
    """A prompt given as the generator's token ids (a non-empty list of ints)."""
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    )


def encode_prompt(tokenizer, prompt: str | Messages | Prompt | TokenIds) -> list[int]:
    """Token ids the generator sees before its first generated token.

    The chat template is applied (with the generation prompt) when the tokenizer has one;
    otherwise the text is tokenized as is. Token ids are taken as they are (a prompt that was
    tokenized without the template, as an OpenAI-style text completion is).
    """
    if is_token_ids(prompt):
        return list(prompt)
    prompt = as_prompt(prompt)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            prompt.as_messages(), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        # Some tokenizer versions return a BatchEncoding even with return_dict=False.
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
        return list(ids)
    text = prompt.text if prompt.text is not None else "\n".join(m["content"] for m in prompt.messages)
    return list(tokenizer(text)["input_ids"])
