"""The OpenAI Chat Completions request, checked field by field, and OpenAI's error shape.

What is supported is read into a :class:`ChatRequest`; what is asked for but not supported
(``n`` other than 1, tools, logprobs, penalties, non-text content or output) is refused with
a 400 naming the parameter, never silently ignored. Fields that change nothing here (``user``,
``metadata``, ``store``, ``service_tier``...) and unknown fields are ignored, as local OpenAI
servers do, so that existing apps work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lambda_split._generate import GenerationConfig

MAX_STOP_STRINGS = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

#: Parameters whose only supported value is their default (or an empty/false one).
_REFUSED_UNLESS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "logprobs": (False, None),
    "top_logprobs": (0, None),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def _unsupported(param: str, what: str) -> APIError:
    return APIError(
        400, f"{what} is not supported by this endpoint", code="unsupported_parameter", param=param
    )


@dataclass(frozen=True)
class Message:
    role: str  # system, user or assistant
    content: str


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # an extension (llama.cpp's name): decode to max_tokens even past an end token

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if self.top_p == 0 else self.temperature,  # top_p 0 keeps only the best token
            top_p=self.top_p or 1.0,
            seed=self.seed,
            stop_strings=self.stop,
            stop_on_eos=not self.ignore_eos,
        )


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a decoded JSON body; raise :class:`APIError` (400) for anything not served as asked."""
    if not isinstance(body, dict):
        raise _invalid("", "the request body must be a JSON object", "invalid_request")
    for name, allowed in _REFUSED_UNLESS_DEFAULT.items():
        if name in body and not any(_same(body[name], value) for value in allowed):
            raise _unsupported(name, f"{name}={_short(body[name])}")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise _unsupported("response_format", "a response_format other than text")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", "output other than text")
    if "model" in body and not isinstance(body["model"], str):
        raise _invalid("model", "model must be a string")
    stream = _optional(body, "stream", bool, False)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _invalid("stream_options", "stream_options must be an object")
    if stream_options is not None and not stream:
        raise _invalid("stream_options", "stream_options is only allowed with stream: true")
    include_usage = _optional(
        stream_options or {}, "include_usage", bool, False, "stream_options.include_usage"
    )
    return ChatRequest(
        messages=_messages(body.get("messages")),
        max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_seed(body),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=include_usage,
        ignore_eos=_optional(body, "ignore_eos", bool, False),
    )


def _same(value: Any, allowed: Any) -> bool:
    return type(value) is type(allowed) and value == allowed if allowed is not None else value is None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _optional(data: dict[str, Any], name: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise _invalid(param or name, f"{param or name} must be a {kind.__name__}")
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _invalid(name, f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _seed(body: dict[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise _invalid("seed", "seed must be a non-negative integer below 2**63")
    return seed


def _max_tokens(body: dict[str, Any]) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(name, f"{name} must be an integer of at least 1")
    return value


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("stop", "stop must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"stop takes at most {MAX_STOP_STRINGS} strings")
    return tuple(stops)


def _messages(messages: Any) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "messages must be a non-empty list", "invalid_request")
    parsed = tuple(_message(index, message) for index, message in enumerate(messages))
    if parsed[-1].role == "assistant":
        raise _unsupported(f"messages[{len(parsed) - 1}]", "continuing a final assistant message")
    return parsed


def _message(index: int, message: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _invalid(where, f"{where} must be an object")
    role = message.get("role")
    if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
        raise _unsupported(where, "tool and function calling")
    if role not in ROLES:
        raise _invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}")
    return Message(ROLES[role], _content(f"{where}.content", message.get("content")))


def _content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise _unsupported(where, "content other than text parts")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(where, f"{where} must be a string or a list of text parts")
