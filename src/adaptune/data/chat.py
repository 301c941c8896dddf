"""Conversations -> token examples: OpenAI-style ``messages`` (with ``tools``, ``tool_calls`` and
``tool`` turns), and ShareGPT ``conversations`` turned into messages.

The chat template renders the conversation; the loss is on every assistant turn (tool-call turns
included), found by rendering the conversation prefix by prefix, never by searching the text.
Rows the template cannot render as they are (tools it ignores) are bad rows with a reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .records import IGNORE_INDEX, BadRow, Example
from .tokens import encode

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def is_unicode(text: str) -> bool:
    """False for a string with a lone UTF-16 surrogate (JSON's "\\ud800" escape allows one); no
    tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_value(value: Any, what: str) -> Any:
    """A value that datasets often store as a JSON string (a table column cannot hold every schema)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        raise BadRow(f"{what} is a string that is not JSON") from None


def _tool_call(call: Any) -> dict:
    """One tool call as chat templates expect it: {type: function, function: {name, arguments: dict}}.

    OpenAI gives ``arguments`` as a JSON string; templates write it with ``tojson``, so it is parsed
    here (a string would be written twice-quoted)."""
    if not isinstance(call, dict):
        raise BadRow("a tool call is not an object")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise BadRow("a tool call has no function name")
    arguments = _json_value(function.get("arguments", {}), "tool call arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise BadRow("tool call arguments are not a JSON object")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _message(m: Any) -> dict:
    """A message checked and cleaned: None-valued keys (a table's missing fields) are dropped, so a
    template's ``is defined`` tests see only what the row has."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRow("a message is not {role: str, content: str}")
    calls = m.get("tool_calls")
    content = m.get("content")
    if content is None and calls:
        content = ""  # OpenAI: an assistant turn that only calls tools has content null
    if not isinstance(content, str):
        raise BadRow("a message is not {role: str, content: str}")
    if not (is_unicode(m["role"]) and is_unicode(content)):
        raise BadRow("a message holds a lone surrogate escape (\\ud800-\\udfff), not text")
    out: dict[str, Any] = {"role": m["role"], "content": content}
    if calls:
        calls = _json_value(calls, "'tool_calls'")
        if not isinstance(calls, list):
            raise BadRow("'tool_calls' is not a list")
        out["tool_calls"] = [_tool_call(c) for c in calls]
    for key in ("tool_call_id", "name"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def checked_messages(messages: Any, what: str = "'messages'") -> list[dict]:
    """The chat messages, checked: a non-empty list of {role, content} with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"{what} is not a non-empty list")
    out = [_message(m) for m in messages]
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no assistant turn")
    return out


def row_tools(row: dict) -> list[dict] | None:
    """The row's ``tools`` (JSON schemas of functions), or None when it has none."""
    tools = _json_value(row.get("tools"), "'tools'")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("'tools' is not a list of tool schemas")
    return tools


def sharegpt_messages(row: dict) -> list[dict]:
    """ShareGPT ``conversations`` ({from: human|gpt|system, value}) as chat messages; a top-level
    ``system`` string (a common variant) becomes the first message."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("'conversations' is not a non-empty list")
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for turn in turns:
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise BadRow("a turn is not {from: str, value: str}")
        role = SHAREGPT_ROLES.get(turn["from"].strip().lower())
        if role is None:
            raise BadRow("a turn's 'from' is not human, gpt or system")
        messages.append({"role": role, "content": turn["value"]})
    return checked_messages(messages, "'conversations'")


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, tools: list[dict] | None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    """How many leading items (characters, token ids) ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _assistant_char_spans(tokenizer: Any, messages: list[dict], full: str,
                          tools: list[dict] | None) -> list[tuple[int, int]]:
    """Character spans of the assistant turns (content + end-of-turn) in the full rendering.

    Found by rendering prefixes of the conversation: turn i starts where the rendering of
    messages[:i] with the generation prompt stops, and ends where messages[:i+1] stops. Taking
    the common prefix with the full text (rather than the prefix's length) keeps this right for
    templates that render earlier turns slightly differently once later turns exist.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = common_prefix_len(full, _render(tokenizer, messages[:i], True, tools)) if i else 0
        end = common_prefix_len(full, _render(tokenizer, messages[:i + 1], False, tools))
        if end > start:
            spans.append((start, end))
    return spans


def _token_mask(tokenizer: Any, text: str,
                spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it overlaps one of the character spans.

    Fast tokenizers give character offsets; slow ones fall back to token counts of text prefixes
    at each span boundary.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        return ids, [any(s < b and e > a for a, b in spans) for s, e in offsets]
    ids = encode(tokenizer, text)
    bounds = [(len(encode(tokenizer, text[:a])), len(encode(tokenizer, text[:b])))
              for a, b in spans]
    return ids, [any(lo <= j < hi for lo, hi in bounds) for j in range(len(ids))]


def _check_tools_rendered(tokenizer: Any, full: str, messages: list[dict], tools: list[dict] | None) -> None:
    """A template without tool support renders tools and tool calls as nothing (the text is the
    same without them): training on that would teach calls the model never sees, so such rows are
    counted, not trained."""
    if tools and _render(tokenizer, messages, False, None) == full:
        raise BadRow("the chat template does not render 'tools'")
    if any("tool_calls" in m for m in messages):
        plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if _render(tokenizer, plain, False, tools) == full:
            raise BadRow("the chat template does not render tool calls")


def chat_example(messages: list[dict], tools: list[dict] | None, tokenizer: Any, train_on_prompt: bool) -> Example:
    """The rendered conversation with labels on the assistant turns (every token if train_on_prompt)."""
    try:
        full = _render(tokenizer, messages, False, tools)
        spans = _assistant_char_spans(tokenizer, messages, full, tools)
        _check_tools_rendered(tokenizer, full, messages, tools)
    except BadRow:
        raise
    except Exception as err:  # jinja raises whatever the template author chose
        raise BadRow(f"chat template error ({type(err).__name__})") from None
    ids, trained = _token_mask(tokenizer, full, spans)
    labels = [t if (keep or train_on_prompt) else IGNORE_INDEX for t, keep in zip(ids, trained)]
    return Example(ids, labels)
