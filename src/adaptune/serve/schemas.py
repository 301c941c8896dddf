"""Request bodies of the OpenAI/vLLM endpoints, with the server's limits.

Fields follow OpenAI's API (and vLLM's extras: ``ignore_eos``, ``stop_token_ids``), plus
adaptune's ``adapters``. Unknown fields are ignored, as OpenAI-compatible servers do; known
fields the server cannot honour (penalties, logit_bias, suffix, best_of) are refused rather than
silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError

MAX_SCALE = 16.0
MAX_ADAPTERS_PER_REQUEST = 8
MAX_STOP = 16
MAX_PROMPTS = 64
MAX_N = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; over a limit is a 400 (429 for a full queue)."""

    max_tokens: int = 2048  # per completion
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_waiting: int = 256  # requests queued for a batch slot


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class AdapterRef(_Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(min_length=1, max_length=200)
    scale: float = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str = Field(min_length=1, max_length=400)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    adapters: list[AdapterRef] | None = Field(None, min_length=1, max_length=MAX_ADAPTERS_PER_REQUEST)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, as a message."""
        if self.frequency_penalty or self.presence_penalty:
            return "frequency_penalty and presence_penalty are not supported"
        if self.logit_bias:
            return "logit_bias is not supported"
        return None

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP or any(len(s) > 200 for s in stop):
            raise ConfigError(f"stop: at most {MAX_STOP} strings of at most 200 characters each")
        return [s for s in stop if s]


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of is not supported"
        return super().unsupported()


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str = Field(min_length=1, max_length=64)
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class LoadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_int_id: int | None = None
