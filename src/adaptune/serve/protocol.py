"""OpenAI's response shapes: completions, chat completions, their stream chunks, log-probs, errors."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence

from .sampling import TokenLogprob

TokenText = Callable[[int], str]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, status: int, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def sse(payload: dict | str) -> str:
    """One server-sent event, as OpenAI streams them."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, request_id: str, model: str, choices: list, created: int | None = None) -> dict:
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model,
            "choices": choices}


# ---- log-probs ----------------------------------------------------------------------------------
def completion_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists of tokens, their log-probs, alternatives, offsets."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        logprobs.append(entry.logprob)
        tops.append({token_text(i): lp for i, lp in entry.top} if entry.logprob is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                        for e in entries]}

