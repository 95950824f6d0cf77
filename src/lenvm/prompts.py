"""Prompts: reading prompt files and turning a prompt into the generator's token ids.

A prompt is plain text or chat messages. A message's content is a string or a list of parts
(OpenAI's form): ``{"type": "text", "text": ...}`` and images, as
``{"type": "image_url", "image_url": {"url": REF}}`` or ``{"type": "image", "image": REF}``. A
record may also give plain text with ``"images": [REF, ...]`` (the images come before the text).
An image reference ``REF`` is a local path, a ``file://`` URL or a ``data:image/...;base64,`` URL.
A relative path is relative to the prompts file it comes from (to the working directory for
prompts given in Python or on the command line) and is made absolute when the prompt is read, so
that rollouts written anywhere point at the same files. Images are kept as these references, never
as pixels; :mod:`lenvm.vision` loads them.

A record may also give ``"chat_template_kwargs"``: an object of variables the chat template
reads (Qwen3's ``enable_thinking``, gpt-oss's ``reasoning_effort``, a date), passed to
``apply_chat_template`` as Hugging Face and vLLM pass them. They are part of the prompt: the same
messages with other arguments are another prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast
from urllib.parse import urlparse

from lenvm.io import InputError, is_int, is_pipe, numbered_jsonl
from lenvm.quoting import quoted, quoted_json

Messages = list[dict[str, Any]]
TokenIds = list[int]


@dataclass
class Prompt:
    """One prompt: plain text or chat messages, with an id that names it in output files, and
    the arguments its chat template is applied with (``chat_template_kwargs``: template
    variables by name).

    The id is a non-empty string; an integer id is taken as its decimal string (as in prompts
    files), so that the rollouts it names read back."""

    id: str
    text: str | None = None
    messages: Messages | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (pid := _prompt_id(self.id)) is None:
            raise InputError(f"a prompt's id must be a non-empty string or an integer, got {self.id!r}")
        self.id = pid
        if (self.text is None) == (self.messages is None):
            raise InputError(f"prompt {self.id!r}: give its text or its messages, one of the two")
        if self.text is not None and not isinstance(self.text, str):
            raise InputError(f"prompt {self.id!r}: its text must be a string, got {type(self.text).__name__}")
        if self.messages is not None and not _is_messages(self.messages):
            raise InputError(f"prompt {self.id!r}: {_MESSAGES_FORM}")
        if (why := template_kwargs_problem(self.chat_template_kwargs)) is not None:
            raise InputError(f"prompt {self.id!r}: {why}")
        if (why := unencodable([self.to_json(), self.chat_template_kwargs])) is not None:
            raise InputError(f"prompt {self.id!r}: {why}")

    def as_messages(self) -> Messages:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.text}]

    def plain_text(self) -> str:
        """The prompt's words: its text, or its messages' text parts, a line a message (images
        left out)."""
        if self.text is not None:
            return self.text
        return "\n".join(
            m["content"]
            if isinstance(m["content"], str)
            else "".join(p["text"] for p in m["content"] if p["type"] == "text")
            for m in self.as_messages()
        )

    def to_json(self) -> str | Messages:
        # Without messages the text is set: __post_init__ takes exactly one of the two.
        return self.messages if self.messages is not None else cast(str, self.text)

    def record_fields(self) -> dict[str, Any]:
        """What a rollout record keeps of this prompt: ``prompt`` (its text or messages) and
        ``chat_template_kwargs`` where it has any (a record without them reads as a prompt without
        them)."""
        fields: dict[str, Any] = {"prompt": self.to_json()}
        if self.chat_template_kwargs:
            fields["chat_template_kwargs"] = self.chat_template_kwargs
        return fields

    def key(self) -> str:
        """What tells this prompt from another (see :func:`prompt_key`)."""
        return prompt_key(self.record_fields())

    @property
    def images(self) -> list[str]:
        """The image references of the prompt, in order (made absolute where they were paths)."""
        return image_references(self.messages)


def prompt_key(record: dict[str, Any]) -> str:
    """What tells one prompt from another, as text, from a record that holds it as
    :meth:`Prompt.record_fields` writes it: its ``prompt`` (text or messages) with its
    ``chat_template_kwargs``, since the same words with other arguments are another prompt. Keys
    are JSON with sorted keys: arguments differ where their JSON does (``0`` is not ``false``);
    none, null and empty ones are alike."""
    fields: dict[str, Any] = {"prompt": record["prompt"]}
    if kwargs := record.get("chat_template_kwargs"):
        fields["chat_template_kwargs"] = kwargs
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def unencodable(value: Any) -> str | None:
    """Why ``value`` (text, or messages) holds something that is not a character, which no
    tokenizer takes: a lone surrogate, as a JSON escape such as ``\\ud800`` or bytes that were
    not UTF-8 leave in Python text. None if it holds none."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(err.object[err.start])
        return (
            f"its text holds U+{code:04X}, a lone surrogate and not a character (a JSON escape, or "
            "bytes that are not UTF-8)"
        )
    except (TypeError, ValueError):  # not JSON at all: other checks name that
        return None
    return None


# apply_chat_template's own arguments, and the conversation the template reads as ``messages``:
# not template variables, so template arguments cannot set them.
_TEMPLATE_CALL_ARGUMENTS = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def template_kwargs_problem(kwargs: Any) -> str | None:
    """Why ``kwargs`` cannot be a chat template's arguments, or None: they must be a JSON object
    (string keys, JSON values: records keep them) that sets none of ``apply_chat_template``'s
    own arguments."""
    if not isinstance(kwargs, dict):
        return f"'chat_template_kwargs' must be an object of template variables, got {type(kwargs).__name__}"
    if (key := next((k for k in kwargs if not isinstance(k, str)), None)) is not None:
        return f"'chat_template_kwargs' must name its variables by strings, got the key {key!r}"
    if taken := sorted(kwargs.keys() & _TEMPLATE_CALL_ARGUMENTS):
        return (
            f"'chat_template_kwargs' cannot set {taken[0]!r}: it is an argument of apply_chat_template "
            "itself, not a template variable"
        )
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError):
        return (
            "'chat_template_kwargs' must hold JSON values (strings, finite numbers, booleans, null, "
            "lists, objects)"
        )
    return None


def _prompt_id(pid: Any) -> str | None:
    """A prompt's id as records store it (a non-empty string; an integer becomes its string), or
    None where ``pid`` is no id."""
    if is_int(pid):
        return str(int(pid))
    return pid if isinstance(pid, str) and pid.strip() else None


_MESSAGES_FORM = (
    "'messages' must be a non-empty list of {role, content} objects (the role a string, the content "
    "a string or a list of parts)"
)


def _is_messages(messages: Any) -> bool:
    """Chat messages in form: a non-empty list of dicts, each with a string role and a content
    that is a string or a list (of parts, which :func:`_check_content` checks)."""
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str | list)
            for m in messages
        )
    )


# Every form a prompt may be given in: text, chat messages, token ids (taken as they are), a
# prompts-file record or a Prompt.
PromptInput = str | Messages | TokenIds | dict[str, Any] | Prompt


def image_references(prompt: str | Messages | None) -> list[str]:
    """The image references of a prompt as records store it (text, or messages: a rollout
    record's ``prompt``), in order."""
    if not isinstance(prompt, list):
        return []
    refs: list[str] = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            refs.extend(ref for ref in map(_part_image, content) if ref is not None)
    return refs


def _part_image(part: dict[str, Any]) -> str | None:
    """The reference of an image part, None for a text part."""
    if part.get("type") == "image":
        return part.get("image")
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return None


def resolve_image(ref: Any, base: Path | None, where: str = "") -> str:
    """An image reference checked and made unambiguous: a relative path becomes absolute (against
    ``base``, else the working directory); URLs stay as they are. Remote URLs are refused: lenvm
    never downloads."""
    if not isinstance(ref, str) or not ref.strip():
        raise InputError(f"{where}an image reference must be a non-empty string, got {ref!r}")
    if ref.startswith("data:"):
        if not ref.startswith("data:image/") or ";base64," not in ref:
            raise InputError(f"{where}a data URL image must read 'data:image/<type>;base64,<data>'")
        return ref
    scheme = urlparse(ref).scheme
    if scheme == "file":
        if urlparse(ref).netloc not in ("", "localhost"):
            raise InputError(f"{where}{ref!r}: a file:// URL must name a local absolute path (file:///...)")
        return ref
    if scheme in ("http", "https"):
        raise InputError(
            f"{where}{ref!r}: remote images are not downloaded; save the image and give its path"
        )
    if len(scheme) > 1:  # one letter is a Windows drive
        raise InputError(
            f"{where}{ref!r}: unknown image URL scheme {scheme!r} (use a path, file:// or data:)"
        )
    path = Path(ref).expanduser()
    return str(path if path.is_absolute() else Path(os.path.abspath((base or Path.cwd()) / path)))


def _check_content(content: Any, base: Path | None, where: str) -> Any:
    """A message's content, checked: a string, or a non-empty list of text and image parts (with
    their image references resolved)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise InputError(f"{where}message content must be a string or a non-empty list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part)
        elif kind == "image" and "image" in part:
            parts.append({**part, "image": resolve_image(part["image"], base, where)})
        elif kind == "image_url" and isinstance(part.get("image_url"), dict | str):
            url = part["image_url"]
            resolved = resolve_image(_part_image(part), base, where)
            parts.append(
                {**part, "image_url": {**url, "url": resolved} if isinstance(url, dict) else resolved}
            )
        else:
            raise InputError(
                f"{where}a content part must be {{'type': 'text', 'text': ...}}, "
                "{'type': 'image_url', 'image_url': {'url': ...}} or {'type': 'image', 'image': ...}, "
                f"got {quoted_json(part)}"
            )
    return parts


def _has_content(content: str | list[dict[str, Any]]) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    return any(p["type"] != "text" or p["text"].strip() for p in content)


def prompt_from_record(
    record: dict[str, Any], default_id: str, where: str = "", base: str | os.PathLike | None = None
) -> Prompt:
    """Build a :class:`Prompt` from ``{"prompt": ...}`` (optionally with ``"images"``) or
    ``{"messages": [...]}``, its id from ``"id"`` or ``"prompt_id"`` (the name rollout records
    give it), its template arguments from ``"chat_template_kwargs"``; relative image paths are
    resolved against ``base`` (default: the working directory)."""
    where = f"{where}: " if where else ""
    if (why := unencodable(record)) is not None:
        raise InputError(f"{where}{why}")
    base = Path(base) if base is not None else None
    key = "prompt_id" if "prompt_id" in record and "id" not in record else "id"
    if key == "id" and "prompt_id" in record and _prompt_id(record["id"]) != _prompt_id(record["prompt_id"]):
        raise InputError(
            f"{where}'id' ({quoted_json(record['id'])}) and 'prompt_id' ({quoted_json(record['prompt_id'])}) "
            "name two ids: give one"
        )
    pid = _prompt_id(record.get(key, default_id))
    if pid is None:
        raise InputError(
            f"{where}'{key}' must be a non-empty string or an integer, got {quoted_json(record.get(key))}"
        )
    own = ("id", "prompt_id", "prompt", "messages", "images", "chat_template_kwargs")
    extra = {k: v for k, v in record.items() if k not in own}
    kwargs = record.get("chat_template_kwargs")
    if kwargs is None:  # null is none, as in rollout records and requests to the server
        kwargs = {}
    if (why := template_kwargs_problem(kwargs)) is not None:
        raise InputError(f"{where}{why}")
    if "messages" in record:
        if "prompt" in record:
            raise InputError(f"{where}give 'prompt' or 'messages', not both")
        if "images" in record:
            raise InputError(f"{where}'images' goes with a 'prompt' string; in messages, use content parts")
        messages = record["messages"]
        if not _is_messages(messages):
            raise InputError(f"{where}{_MESSAGES_FORM}")
        messages = [{**m, "content": _check_content(m["content"], base, where)} for m in messages]
        if not any(_has_content(m["content"]) for m in messages):
            raise InputError(f"{where}the prompt is empty")
        return Prompt(pid, messages=messages, extra=extra, chat_template_kwargs=kwargs)
    text = record.get("prompt")
    if not isinstance(text, str):
        raise InputError(f"{where}expected a 'prompt' string or a 'messages' list")
    images = record.get("images")
    if images is not None:
        if not isinstance(images, list) or not images:
            raise InputError(f"{where}'images' must be a non-empty list of image references")
        parts = [{"type": "image_url", "image_url": {"url": resolve_image(r, base, where)}} for r in images]
        content = [*parts, {"type": "text", "text": text}] if text.strip() else parts
        return Prompt(
            pid, messages=[{"role": "user", "content": content}], extra=extra, chat_template_kwargs=kwargs
        )
    if not text.strip():
        raise InputError(f"{where}the prompt is empty")
    return Prompt(pid, text=text, extra=extra, chat_template_kwargs=kwargs)


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a prompts JSONL file (``-``: the standard input); a record's ``id`` (or ``prompt_id``)
    defaults to its position (0, 1, ...; blank lines skipped); duplicate ids are an error, and
    errors name the file and line. Relative image paths are relative to the file's folder (to the
    working directory for the standard input or a pipe)."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    base = Path.cwd() if str(path) == "-" or is_pipe(path) else Path(path).parent
    name = "<stdin>" if str(path) == "-" else path
    for index, (lineno, record) in enumerate(numbered_jsonl(path, stdin=True)):
        prompt = prompt_from_record(record, str(index), where=f"{name}:{lineno}", base=base)
        if prompt.id in seen:
            raise InputError(f"{name}:{lineno}: duplicate prompt id {quoted(prompt.id)}")
        seen.add(prompt.id)
        prompts.append(prompt)
    if not prompts:
        raise InputError(f"{name}: no prompts in file")
    return prompts


def as_prompt(prompt: PromptInput, default_id: str = "0", images: list[str] | None = None) -> Prompt:
    """Accept a string, a message list, a :class:`Prompt` or a prompts-file record (``{"prompt":
    ...}`` or ``{"messages": [...]}``, with an optional ``"id"`` or ``"prompt_id"``); ``images``
    (references) go with a string prompt, before its text. Token ids are refused with a clear
    error: the callers that take them read them first."""
    if isinstance(prompt, Prompt):
        return prompt
    if isinstance(prompt, dict):
        if images:
            raise InputError("images go in the record's 'images' list")
        return prompt_from_record(prompt, default_id)
    if isinstance(prompt, str):
        record: dict[str, Any] = {"prompt": prompt}
        if images:
            record["images"] = list(images)
        return prompt_from_record(record, default_id)
    if images:
        raise InputError("images go with a string prompt; in messages, put them in the content parts")
    if not isinstance(prompt, list):
        raise InputError(
            f"a prompt is text, a list of messages, a Prompt, a prompts-file record or a list of token "
            f"ids (Python ints), got {type(prompt).__name__}"
        )
    if not prompt:
        raise InputError("the prompt is an empty list: no messages and no token ids")
    if is_token_ids(prompt):  # the callers that take ids handle them before they get here
        raise InputError("token ids are not taken here: give the prompt as text or messages")
    if not all(isinstance(m, dict) for m in prompt):  # not messages: token ids of the wrong kind
        raise InputError(
            f"a list prompt holds messages ({{role, content}} objects) or token ids (Python ints), "
            f"got a list of {type(next(m for m in prompt if not isinstance(m, dict))).__name__}"
        )
    return prompt_from_record({"messages": prompt}, default_id)


def is_token_ids(prompt: object) -> TypeGuard[TokenIds]:
    """A prompt given as the generator's token ids (a non-empty list of ints)."""
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    )


def template_messages(prompt: Prompt) -> Messages:
    """The prompt's messages as a chat template takes them: content that is only text becomes one
    string (what text-only templates expect), and an image part becomes ``{"type": "image"}``
    (what vision-language templates turn into their image placeholder)."""
    out = []
    for message in prompt.as_messages():
        content = message["content"]
        if isinstance(content, list):
            if all(p["type"] == "text" for p in content):
                content = "".join(p["text"] for p in content)
            else:
                content = [p if p["type"] == "text" else {"type": "image"} for p in content]
        out.append({**message, "content": content})
    return out


def encode_prompt(
    tokenizer,
    prompt: str | Messages | Prompt | TokenIds,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Token ids the generator sees before its first generated token.

    The chat template is applied (with the prompt's template arguments and, unless
    ``add_generation_prompt`` is off, the generation prompt; ``continue_final_message`` leaves
    the last message open for the generator to go on with) when the tokenizer has one; otherwise
    the text is tokenized as is. A prompt with images needs a vision-language generator's
    tokenizer; its ids hold the image placeholders as the model reads them (see
    :func:`lenvm.vision.encode`, which also gives the pixel inputs). Token ids are taken as they
    are (a prompt that was tokenized without the template, as an OpenAI-style text completion is).
    """
    from lenvm.vision import encode  # a vision-language generator's tokenizer carries its processor

    return encode(
        tokenizer,
        prompt,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
    ).ids


def template_ids(
    tokenizer,
    prompt: Prompt,
    chat_template: str | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Token ids of ``prompt`` through the tokenizer's chat template (or ``chat_template``), with
    the prompt's template arguments; see :func:`encode_prompt` for the two switches. Without a
    chat template the text is tokenized as is: the switches change nothing then, and template
    arguments, with nothing to take them, are refused."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        ids = tokenizer.apply_chat_template(
            template_messages(prompt),
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
            # Passed only when on: some tokenizers' apply_chat_template does not take it.
            **({"continue_final_message": True} if continue_final_message else {}),
            **prompt.chat_template_kwargs,
        )
        # Some tokenizer versions return a BatchEncoding even with return_dict=False.
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
        return list(ids)
    if prompt.chat_template_kwargs:
        raise InputError(
            f"prompt {prompt.id!r} gives chat_template_kwargs ({', '.join(prompt.chat_template_kwargs)}), "
            "but the tokenizer has no chat template to pass them to: leave them out, or use a tokenizer "
            "with a chat template"
        )
    if prompt.text is not None:
        return list(tokenizer(prompt.text)["input_ids"])
    messages = template_messages(prompt)
    if len(messages) != 1 or messages[0]["role"] != "user" or not isinstance(messages[0]["content"], str):
        # Joined into one text, the roles and turns would be lost without a word.
        raise InputError(
            f"prompt {prompt.id!r}: the tokenizer has no chat template, so a conversation (roles, turns) "
            "cannot be written out for it: give the prompt as text (or one user message), or a tokenizer "
            "with a chat template"
        )
    return list(tokenizer(messages[0]["content"])["input_ids"])
