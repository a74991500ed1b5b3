"""Request bodies of the API, checked field by field: a wrong type or value is a 400 that
names the field, a feature this server lacks is a 400 that names it, and unknown fields are
ignored (clients send many this API does not define)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.engine.tokenizer import ChatMessage
from service.transports.openai.errors import bad_request, unsupported

# Fields other servers accept that would change the answer's meaning here: refused by name.
_UNSUPPORTED = ("tools", "functions", "audio", "prediction", "web_search_options")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True)
class Common:
    model: str | None
    sampling: dict[str, Any]  # the given sampling fields, as the chat core takes them
    n: int
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class ChatRequest(Common):
    messages: list[ChatMessage]


@dataclass(frozen=True, slots=True)
class CompletionRequest(Common):
    prompt: str | list[int]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise bad_request(f"{name} must be a number", name, "invalid_type")
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise bad_request(f"{name} must be an integer", name, "invalid_type")
    return int(value)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean", name, "invalid_type")
    return value


def _common(body: dict[str, Any], max_n: int) -> Common:
    for name in _UNSUPPORTED:
        if body.get(name):
            raise unsupported(name)
    if body.get("tool_choice") not in (None, "none"):
        raise unsupported("tool_choice")
    if body.get("function_call") not in (None, "none"):
        raise unsupported("function_call")
    if body.get("logit_bias"):
        raise unsupported("logit_bias")
    if _flag(body, "logprobs") or body.get("top_logprobs"):
        raise unsupported("logprobs")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise unsupported("response_format", "response_format other than {'type': 'text'}")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("modalities", "output other than text")

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model", "invalid_type")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user must be a string", "user", "invalid_type")

    sampling: dict[str, Any] = {}
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        number = _number(body, name)
        if number is not None:
            sampling[name] = number
    seed = _integer(body, "seed")
    if seed is not None:
        sampling["seed"] = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        sampling["stop"] = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            sampling["stop"] = tuple(stop)
    elif stop is not None:
        raise bad_request("stop must be a string or a list of strings", "stop", "invalid_type")

    n = _integer(body, "n")
    if n is None:
        n = 1
    if not 1 <= n <= max_n:
        raise bad_request(f"n must be between 1 and {max_n}", "n")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
    include_usage = bool(options and options.get("include_usage"))
    if include_usage and not stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    return Common(model=model, sampling=sampling, n=n, stream=stream, include_usage=include_usage)


def _content(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise unsupported(f"{where}[{j}]", f"content of type {kind!r}")
                raise bad_request(f"{where}[{j}] must be a text part", f"{where}[{j}]", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where} must be a string or a list of text parts", where, "invalid_type")


def chat_request(body: object, max_n: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", None, "invalid_type")
    common = _common(body, max_n)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list", "messages", "invalid_type")
    messages: list[ChatMessage] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            if role in ("tool", "function"):
                raise unsupported(f"{where}.role", f"role {role!r}")
            raise bad_request(f"{where}.role must be system, user or assistant", f"{where}.role")
        if message.get("tool_calls") or message.get("function_call"):
            raise unsupported(f"{where}.tool_calls")
        content = message.get("content")
        text = "" if content is None and role == "assistant" else _content(content, f"{where}.content")
        messages.append(ChatMessage(role=_ROLES[role], content=text))
    return ChatRequest(**_fields(common), messages=messages)


def completion_request(body: object, max_n: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", None, "invalid_type")
    common = _common(body, max_n)
    for name in ("echo", "suffix"):
        if body.get(name):
            raise unsupported(name)
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise unsupported("best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        prompt = [int(t) for t in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise unsupported("prompt", "a batch of several prompts")
    else:
        raise bad_request(
            "prompt must be a string or a non-empty list of token ids", "prompt", "invalid_type"
        )
    return CompletionRequest(**_fields(common), prompt=prompt)


def _fields(common: Common) -> dict[str, Any]:
    return {
        "model": common.model,
        "sampling": common.sampling,
        "n": common.n,
        "stream": common.stream,
        "include_usage": common.include_usage,
    }
