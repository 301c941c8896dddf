"""An Ollama ``Modelfile`` for an exported GGUF: ``FROM``, ``TEMPLATE``, ``SYSTEM``, ``PARAMETER stop``.

Ollama formats chats with Go templates, models on the Hugging Face side with Jinja. Translating
Jinja in general would be guessing, so only a known format is written, and only after checking it:
the model's own Jinja template is rendered on a few sample conversations and must give exactly
what Ollama will give with the Go template written here. ChatML (``<|im_start|>role ... <|im_end|>``,
SmolLM2's and Qwen2's format) is the one known format; a template that puts in a default system
prompt when the conversation has none (SmolLM2's does) gets it as the Modelfile's ``SYSTEM``, which
Ollama puts in front of conversations that lack one. Anything else is left out of the Modelfile,
with a comment and a printed line saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Messages = list[dict[str, str]]

# Ollama joins every system message into .System and also keeps them in .Messages (template.go's
# collate; older versions dropped them there), so the range skips them to give one system block
# in both.
CHATML_GO = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n'
    '{{- range .Messages }}\n'
    '{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\n'
    '{{- end }}<|im_start|>assistant\n'
)
CHATML_STOPS = ["<|im_end|>"]

PROBES: list[Messages] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


def ollama_chatml(messages: Messages, default_system: str | None) -> str:
    """What Ollama sends the model for ``messages`` with :data:`CHATML_GO` and ``SYSTEM default_system``
    (routes.go puts the Modelfile's SYSTEM first when the chat does not start with a system message)."""
    if default_system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    out += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages if m["role"] != "system")
    return out + "<|im_start|>assistant\n"


@dataclass
class Translation:
    """The Modelfile lines that format chats, or why there are none."""

    template: str | None = None
    system: str | None = None
    stops: list[str] = field(default_factory=list)
    reason: str | None = None  # set when no template was written


def translate(chat_template: str | None, render: Callable[[Messages], str]) -> Translation:
    """Check the model's chat template against ChatML; ``render(messages)`` applies the Jinja template
    with the generation prompt added."""
    if not chat_template:
        return Translation(reason="the model has no chat template, so Ollama will pass prompts through as they are")
    try:
        rendered = [render(m) for m in PROBES]
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own template means: not ChatML
        return Translation(reason=f"its chat template could not be rendered on sample conversations ({exc})")
    default = _default_system(rendered[0])
    if "<|im_start|>" in chat_template and all(r == ollama_chatml(m, default) for m, r in zip(PROBES, rendered)):
        if default is not None and '"""' in default:
            return Translation(reason="its default system prompt contains triple quotes, which a Modelfile cannot hold")
        return Translation(CHATML_GO, default, list(CHATML_STOPS))
    return Translation(reason="its chat template is not one adaptune can translate faithfully into Ollama's Go "
                              "template (ChatML is)")


def _default_system(rendered_user_only: str) -> str | None:
    """The system prompt a template adds by itself to a chat without one, if any."""
    head = "<|im_start|>system\n"
    if not rendered_user_only.startswith(head):
        return None
    end = rendered_user_only.find("<|im_end|>\n", len(head))
    return rendered_user_only[len(head):end] if end >= 0 else None


def modelfile(gguf_name: str, translation: Translation) -> str:
    """The Modelfile text (the GGUF sits next to it)."""
    lines = ["# Written by `adaptune export --format ollama`. Create the model with:",
             "#   ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if translation.template is None:
        lines += ["", f"# No TEMPLATE: {translation.reason}.",
                  "# Ollama then uses a template it recognises from the GGUF's own chat template, if any;",
                  "# check with `ollama show NAME --template` and add a TEMPLATE here if it is wrong."]
        return "\n".join(lines) + "\n"
    lines += ["", f'TEMPLATE """{translation.template}"""']
    if translation.system:
        lines.append(f'SYSTEM """{translation.system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in translation.stops]
    return "\n".join(lines) + "\n"
