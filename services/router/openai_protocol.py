"""OpenAI request bodies (validated with pydantic) and response bodies (plain dicts: the stream's
hot path serializes dicts with json.dumps, several times faster than pydantic models).

Fields OpenAI defines that pdmesh cannot honour are refused with a 400 naming the field (unless
they carry their neutral value); unknown extra fields are ignored, as vLLM does. Extensions
taken from vLLM because benchmark tools send them: `ignore_eos`.
"""

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pdmesh.v1 import common_pb2
from services.common.errors import InvalidArgument

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when `temperature` is omitted (gRPC's unset is greedy)
MAX_STOP_STRINGS = 4

FINISH_REASONS = {common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_STOP: "stop",
                  common_pb2.FINISH_REASON_ABORT: "abort"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        return [s for s in stops if s]

    def sampling(self) -> common_pb2.SamplingParams:
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        sampling = common_pb2.SamplingParams(temperature=temperature, top_p=1.0 if self.top_p is None else self.top_p)
        if self.seed is not None:
            sampling.seed = self.seed
        return sampling

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Raises InvalidArgument for fields set to something pdmesh cannot do."""
        if self.n not in (None, 1):
            raise InvalidArgument(f"n: only n=1 is supported, got {self.n}; send separate requests instead")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options: only allowed when stream is true")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise InvalidArgument(f"{name}: penalties are not supported; leave it unset or 0")
        if self.logit_bias:
            raise InvalidArgument("logit_bias: not supported; leave it unset")


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidArgument("echo: not supported; leave it unset or false")
        if self.logprobs is not None:
            raise InvalidArgument("logprobs: not supported; leave it unset")
        if self.best_of not in (None, 1):
            raise InvalidArgument(f"best_of: only 1 is supported, got {self.best_of}")
        if self.suffix:
            raise InvalidArgument("suffix: not supported; leave it unset")

    def prompt_text_or_ids(self) -> str | list[int]:
        """The one prompt: text, or token ids used as they are."""
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of exactly one prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            raise InvalidArgument(f"prompt: one prompt per request is supported, got a batch of {len(prompt)}")
        return prompt

    def max_tokens_for(self, prompt_tokens: int, cap: int) -> int:
        return COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise InvalidArgument("logprobs: not supported; leave logprobs and top_logprobs unset")
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidArgument("tools: tool calling is not supported; leave tools and tool_choice unset")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidArgument("response_format: only {\"type\": \"text\"} is supported")

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def max_tokens_for(self, prompt_tokens: int, cap: int) -> int:
        """OpenAI's chat default is "until the context is full": the router's cap for this prompt."""
        chosen = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return max(1, cap - prompt_tokens) if chosen is None else chosen


# ---- responses (plain dicts) ---------------------------------------------------------------------

def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_body(response_id: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def chat_body(response_id: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    message = {"role": "assistant", "content": text}
    return {"id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


class ChunkMaker:
    """Stream chunks of one response: same id, model and creation time on each."""

    def __init__(self, chat: bool, response_id: str, model: str, include_usage: bool):
        self.chat, self.include_usage = chat, include_usage
        self._head = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": int(time.time()), "model": model}

    def piece(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, usage: dict) -> dict:
        return {**self._head, "choices": [], "usage": usage}
