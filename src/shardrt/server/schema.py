"""The OpenAI wire shapes: request bodies parsed into frozen dataclasses, and the response,
stream-chunk and error bodies that the official `openai` client parses.

Every refusal is an `ApiError` that names the field and the value and says what would be
accepted. OpenAI fields that change nothing at their neutral value (`n`: 1, `presence_penalty`:
0, `user`, ...) are accepted there and refused elsewhere; fields nobody defined are refused.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..errors import ShardrtError

MAX_STOP = 4
MAX_TEMPERATURE = 2.0
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left
ROLES = ("system", "user", "assistant")
MAX_SEED = 2**63


class ApiError(ShardrtError):
    """A request the server refuses, or a failure it reports, as an OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = "invalid_value",
                 kind: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class GenerateRequest:
    """One `/v1/completions` (kind "text") or `/v1/chat/completions` (kind "chat") request."""

    kind: str
    model: str
    prompt: str | None = None
    messages: tuple[Message, ...] = ()
    max_tokens: int | None = None  # None: the endpoint's default, bounded by the room in max_ctx
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (as in vLLM); 0 means no cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # extension (as in vLLM): generate exactly max_tokens
    pflash: bool = False  # extension: a long prompt is compressed by the server's PFlash drafter first
    max_tokens_field: str = "max_tokens"  # or max_completion_tokens: the name an error gives back

    @property
    def prompt_field(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def resolve_max_tokens(self, prompt_tokens: int, max_ctx: int) -> int:
        """The completion budget: the request's, checked against what the prompt leaves of max_ctx."""
        room = max_ctx - prompt_tokens
        if prompt_tokens == 0:
            raise ApiError(f"{self.prompt_field}: the prompt is empty; give at least one token of text", self.prompt_field)
        if room < 1:
            raise ApiError(f"{self.prompt_field}: the prompt is {prompt_tokens} tokens, which leaves no room in the "
                           f"server's max_ctx of {max_ctx}", self.prompt_field, code="context_length_exceeded")
        if self.max_tokens is None:
            return room if self.kind == "chat" else min(DEFAULT_COMPLETION_TOKENS, room)
        if self.max_tokens > room:
            name = self.max_tokens_field
            raise ApiError(f"{name}: {self.max_tokens} is more than the {room} tokens that the {prompt_tokens}-token prompt "
                           f"leaves in max_ctx {max_ctx}; give at most {room}", name, code="context_length_exceeded")
        return self.max_tokens


# -- parsing --------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _refuse(name: str, value: Any, accepted: str, code: str = "invalid_value") -> ApiError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ApiError(f"{name}: {shown} is not accepted; give {accepted}", name, code=code)


def _neutral_only(*neutral: Any):
    def check(value: Any) -> bool:
        return any(value == n and type(value) is type(n) for n in neutral)
    return check


def _any_of(*types):
    return lambda value: value is None or isinstance(value, types)


# field -> (is the value harmless, what is accepted)
_COMMON_NEUTRAL = {
    "n": (_neutral_only(None, 1), "1 (one choice per request)"),
    "presence_penalty": (_neutral_only(None, 0, 0.0), "0 (penalties are not supported)"),
    "frequency_penalty": (_neutral_only(None, 0, 0.0), "0 (penalties are not supported)"),
    "logit_bias": (lambda v: v is None or v == {}, "null or {} (logit bias is not supported)"),
    "user": (_any_of(str), "a string"),
    "metadata": (_any_of(dict), "an object"),
    "store": (_any_of(bool), "true or false"),
    "service_tier": (_any_of(str), "a string"),
}
_CHAT_NEUTRAL = {
    **_COMMON_NEUTRAL,
    "logprobs": (_neutral_only(None, False), "false (log probabilities are not supported)"),
    "top_logprobs": (_neutral_only(None, 0), "null or 0 (log probabilities are not supported)"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, '{"type": "text"} (structured output is not supported)'),
    "tools": (lambda v: v is None or v == [], "null or [] (tools are not supported)"),
    "tool_choice": (_neutral_only(None, "none", "auto"), '"none" (tools are not supported)'),
    "parallel_tool_calls": (_any_of(bool), "true or false"),
    "modalities": (lambda v: v is None or v == ["text"], '["text"]'),
}
_TEXT_NEUTRAL = {
    **_COMMON_NEUTRAL,
    "logprobs": (_neutral_only(None, 0), "null or 0 (log probabilities are not supported)"),
    "echo": (_neutral_only(None, False), "false (echo is not supported)"),
    "best_of": (_neutral_only(None, 1), "1"),
    "suffix": (_neutral_only(None, ""), "null (suffix is not supported)"),
}
_SAMPLING = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
             "ignore_eos", "pflash")
CHAT_FIELDS = frozenset(_SAMPLING + ("messages", "max_completion_tokens") + tuple(_CHAT_NEUTRAL))
TEXT_FIELDS = frozenset(_SAMPLING + ("prompt",) + tuple(_TEXT_NEUTRAL))


def parse_request(kind: str, body: Any, served_model: str) -> GenerateRequest:
    """A JSON body (already decoded) for endpoint `kind` ("chat" or "text") -> GenerateRequest."""
    if not isinstance(body, dict):
        raise ApiError(f"body: a JSON {type(body).__name__} is not accepted; give a JSON object", None)
    fields, neutral = (CHAT_FIELDS, _CHAT_NEUTRAL) if kind == "chat" else (TEXT_FIELDS, _TEXT_NEUTRAL)
    for name in body:
        if name not in fields:
            raise ApiError(f"{name}: unknown field; accepted: {', '.join(sorted(fields))}", name, code="unknown_field")
    for name, (ok, accepted) in neutral.items():
        if name in body and not ok(body[name]):
            raise _refuse(name, body[name], accepted, code="unsupported_value")

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _refuse("model", model, f"the served model's name, {served_model!r}") if "model" in body else \
            ApiError(f"model: missing; give the served model's name, {served_model!r}", "model", code="missing")
    if model != served_model:
        raise ApiError(f"model: {model!r} is not served here; this server serves {served_model!r}", "model",
                       code="model_not_found")

    fields_out: dict[str, Any] = {"kind": kind, "model": model}
    if kind == "chat":
        fields_out["messages"] = _messages(body.get("messages"), "messages" in body)
        fields_out["max_tokens"] = _max_tokens(body)
        if body.get("max_completion_tokens") is not None:
            fields_out["max_tokens_field"] = "max_completion_tokens"
    else:
        fields_out["prompt"] = _prompt(body.get("prompt"), "prompt" in body)
        fields_out["max_tokens"] = _optional_int(body, "max_tokens", 1, "an integer >= 1")

    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise _refuse("temperature", temperature, f"a number in [0, {MAX_TEMPERATURE:g}] (0 is greedy)")
        fields_out["temperature"] = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise _refuse("top_p", top_p, "a number in (0, 1]")
        fields_out["top_p"] = float(top_p)
    top_k = _optional_int(body, "top_k", 0, "an integer >= 0 (0: no cut)")
    if top_k is not None:
        fields_out["top_k"] = top_k
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed < MAX_SEED:
            raise _refuse("seed", seed, "an integer in [0, 2**63)")
        fields_out["seed"] = seed
    fields_out["stop"] = _stop(body.get("stop"))
    fields_out["stream"] = _optional_bool(body, "stream")
    fields_out["ignore_eos"] = _optional_bool(body, "ignore_eos")
    fields_out["pflash"] = _optional_bool(body, "pflash")
    options = body.get("stream_options")
    if options is not None:
        if not fields_out["stream"]:
            raise _refuse("stream_options", options, "null unless stream is true")
        if not isinstance(options, dict):
            raise _refuse("stream_options", options, 'an object such as {"include_usage": true}')
        for key, value in options.items():
            if key not in ("include_usage", "include_obfuscation"):
                raise ApiError(f"stream_options.{key}: unknown field; accepted: include_usage", f"stream_options.{key}",
                               code="unknown_field")
            if value is not None and not isinstance(value, bool):
                raise _refuse(f"stream_options.{key}", value, "true or false")
        fields_out["include_usage"] = bool(options.get("include_usage"))
    return GenerateRequest(**fields_out)


def _optional_int(body: dict, name: str, least: int, accepted: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < least:
        raise _refuse(name, value, accepted)
    return value


def _optional_bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _refuse(name, value, "true or false")
    return bool(value)


def _max_tokens(body: dict) -> int | None:
    old = _optional_int(body, "max_tokens", 1, "an integer >= 1")
    new = _optional_int(body, "max_completion_tokens", 1, "an integer >= 1")
    if old is not None and new is not None and old != new:
        raise ApiError(f"max_completion_tokens: {new} disagrees with max_tokens {old}; give one of them",
                       "max_completion_tokens")
    return new if new is not None else old


def _prompt(value: Any, present: bool) -> str:
    if not present:
        raise ApiError("prompt: missing; give a string", "prompt", code="missing")
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise _refuse("prompt", value, "a string, or a list holding one string (token-id and batch prompts are "
                                           "not supported)")
        value = value[0]
    if not isinstance(value, str):
        raise _refuse("prompt", value, "a string")
    return value


def _messages(value: Any, present: bool) -> tuple[Message, ...]:
    if not present:
        raise ApiError("messages: missing; give a list of {role, content}", "messages", code="missing")
    if not isinstance(value, list) or not value:
        raise _refuse("messages", value, "a non-empty list of {role, content} objects")
    out = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise _refuse(where, item, "an object {role, content}")
        for key in item:
            if key not in ("role", "content", "name"):
                raise ApiError(f"{where}.{key}: unknown field; accepted: role, content, name", f"{where}.{key}",
                               code="unknown_field")
        role = item.get("role")
        if role not in ROLES:
            raise _refuse(f"{where}.role", role, " or ".join(ROLES))
        if "name" in item and not isinstance(item["name"], str):
            raise _refuse(f"{where}.name", item["name"], "a string")
        out.append(Message(role, _content(item.get("content"), f"{where}.content")))
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A string, or a list of text parts (what newer clients send), joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        parts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) <= {"type", "text"}):
                raise _refuse(f"{where}[{j}]", part, 'a text part {"type": "text", "text": "..."} (images and audio '
                                                     'are not supported)')
            parts.append(part["text"])
        return "".join(parts)
    raise _refuse(where, value, "a string")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_STOP:
        raise _refuse("stop", value, f"a string or a list of at most {MAX_STOP} strings")
    for i, item in enumerate(items):
        name = "stop" if isinstance(value, str) else f"stop[{i}]"
        if not isinstance(item, str) or not item:
            raise _refuse(name, item, "a non-empty string")
    return tuple(items)


# -- responses ----------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """The response body, or the stream chunks, of one request, sharing one id and timestamp."""

    def __init__(self, request: GenerateRequest):
        self.request = request
        self.chat = request.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.request.model,
                "system_fingerprint": None}

    def full(self, text: str, finish_reason: str, counts: dict) -> dict:
        out = self._base("chat.completion" if self.chat else "text_completion")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**out, "choices": [choice], "usage": counts}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        if self.chat:
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        out["choices"] = [choice]
        if self.request.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, counts: dict) -> dict:
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        return {**out, "choices": [], "usage": counts}
