"""``export()``: one adapter folder -> a LoRA GGUF, a merged GGUF, or a merged GGUF with an Ollama Modelfile.

Everything a user can get wrong (format, quant, output path, adapter kind, architecture) is checked
before the base model is loaded, and each problem is one ``AdaptuneError`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .check import CheckReport
from .writer import QUANTS

FORMATS = ("gguf-lora", "gguf", "ollama")
QUANT_CHOICES = (*QUANTS, "source")
# 8-bit keeps a fine-tune's effect (docs/export.md); re-rounding merged weights to a 4-bit source type
# (--quant source on the embedded Q4_1 model) loses much of it
DEFAULT_MERGED_QUANT = "q8_0"
OLLAMA_GGUF = "model.gguf"
MODELFILE = "Modelfile"


@dataclass
class ExportResult:
    format: str
    output: Path
    gguf_path: Path
    quant: str
    size_bytes: int
    notes: list[str] = field(default_factory=list)
    check: CheckReport | None = None


@dataclass
class _Base:
    """Where the base model comes from."""

    name: str | None  # what hub.load_* take (None: the embedded default)
    gguf: Path | None  # the GGUF file, when the base is one


def export(adapter: str | Path, format: str, output: str | Path, model: str | None = None, quant: str | None = None,
           check: bool = False, overwrite: bool = False, allow_pickle: bool = False,
           trust_remote_code: bool = False) -> ExportResult:
    """Export ``adapter`` (a peft-format LoRA folder) for llama.cpp / Ollama; see docs/export.md."""
    from .adapter import read_config, refuse_prompt_learning

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if quant is not None and quant not in QUANT_CHOICES:
        raise ConfigError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, not {quant!r}")
    if format == "gguf-lora" and quant == "source":
        raise ConfigError("--quant source is for the merged formats (gguf, ollama); a LoRA GGUF is f32, f16, bf16 "
                          "or q8_0")
    if format == "gguf-lora" and check:
        raise ConfigError("--check reads back a merged GGUF (--format gguf or ollama); a LoRA GGUF runs only "
                          "next to its base in llama.cpp")
    output = _check_output(Path(output), Path(adapter), format, overwrite)
    config = read_config(adapter)
    refuse_prompt_learning(config)
    base = _resolve_base(model, config)
    if format == "gguf-lora":
        return _export_lora(adapter, config, base, output, quant or "f32", allow_pickle, trust_remote_code)
    if quant == "source" and base.gguf is None:
        raise ConfigError(f"--quant source keeps the tensor types of a GGUF base, and the base {base.name} is not a "
                          f"GGUF file (choose one of {', '.join(QUANTS)})")
    quant = quant or DEFAULT_MERGED_QUANT
    return _export_merged(adapter, base, output, format, quant, check, allow_pickle, trust_remote_code)


def _check_output(output: Path, adapter: Path, format: str, overwrite: bool) -> Path:
    from ..atomic import check_writable

    if output.exists() or output.is_symlink():
        if format != "ollama" and output.is_dir():
            raise ConfigError(f"--output {output} is a folder; --format {format} writes one .gguf file "
                              f"(e.g. --output {output / 'model.gguf'})")
        if format == "ollama" and not output.is_dir():
            raise ConfigError(f"--output {output} is a file; --format ollama writes a folder (a GGUF and a Modelfile)")
        if not overwrite:
            raise ConfigError(f"--output {output} exists; pass --overwrite to replace it, or choose another path")
    resolved, adapter_resolved = output.resolve(), adapter.resolve()
    if resolved == adapter_resolved or (format == "ollama" and resolved in adapter_resolved.parents):
        raise ConfigError(f"--output {output} would replace the adapter folder; write the export elsewhere")
    check_writable(output.parent if str(output.parent) else Path("."))
    return output


def _resolve_base(model: str | None, config: Any) -> _Base:
    from ..hub import names_embedded_default, resolve_model_source

    name = model
    if name is None:
        recorded = config.base_model_name_or_path
        name = None if not recorded or names_embedded_default(recorded) else recorded
    elif names_embedded_default(name):
        name = None
    source, extra = resolve_model_source(name)
    return _Base(name, Path(source) / extra["gguf_file"] if "gguf_file" in extra else None)


def _export_lora(adapter, config, base: _Base, output: Path, quant: str, allow_pickle: bool,
                 trust_remote_code: bool) -> ExportResult:
    from ..hub import load_config
    from .adapter import read_pairs
    from .gguf_lora import write_lora_gguf
    from .names import arch_of

    base_config = load_config(base.name, trust_remote_code=trust_remote_code)
    arch = arch_of(base_config)
    pairs = read_pairs(adapter, config, allow_pickle=allow_pickle)
    size = write_lora_gguf(output, pairs, arch, base_config, float(config.lora_alpha), quant,
                           name=Path(adapter).resolve().name, base_tensors=_base_tensor_names(base, base_config, arch))
    notes = [f"use it next to the base GGUF: llama-cli -m BASE.gguf --lora {output}"]
    return ExportResult("gguf-lora", output, output, quant, size, notes)


def _base_tensor_names(base: _Base, base_config: Any, arch) -> set[str]:
    """The tensor names of the base in llama.cpp, to refuse a LoRA on a weight it does not have."""
    if base.gguf is not None:
        import gguf

        return {t.name for t in gguf.GGUFReader(str(base.gguf)).tensors}
    import torch
    from transformers import AutoModelForCausalLM

    from .gguf_merged import gguf_state

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(base_config)
    return set(gguf_state(meta, arch))


def _export_merged(adapter, base: _Base, output: Path, format: str, quant: str, check: bool,
                   allow_pickle: bool, trust_remote_code: bool) -> ExportResult:
    from ..hub import load_config, load_model_and_tokenizer
    from ..peft_model import PeftModel
    from .names import arch_of

    arch = arch_of(load_config(base.name, trust_remote_code=trust_remote_code))  # before the slow load
    model, tokenizer = load_model_and_tokenizer(base.name, trust_remote_code=trust_remote_code,
                                                device="cpu", dtype="float32")
    merged = PeftModel.from_pretrained(model, adapter, allow_pickle=allow_pickle).merge_and_unload(safe_merge=True)
    merged.eval()
    name = Path(adapter).resolve().name
    if format == "gguf":
        size = _write_merged(output, merged, tokenizer, arch, quant, base, name)
        result = ExportResult(format, output, output, quant, size)
    else:
        result = _write_ollama(output, merged, tokenizer, arch, quant, base, name)
    if check:
        from .check import ExportCheckFailed, check_merged

        result.check = check_merged(result.gguf_path, merged, tokenizer, quant)
        if not result.check.passed:
            raise ExportCheckFailed(f"{result.check.line()}; the file is left at {result.gguf_path} for inspection")
    return result


def _write_merged(path: Path, merged, tokenizer, arch, quant: str, base: _Base, name: str) -> int:
    from .gguf_merged import write_merged_gguf

    return write_merged_gguf(path, merged, tokenizer, arch, quant, source_gguf=base.gguf, name=name)


def _write_ollama(output: Path, merged, tokenizer, arch, quant: str, base: _Base, name: str) -> ExportResult:
    from ..atomic import atomic_directory, atomic_write_text
    from .ollama import modelfile, translate

    template = _chat_template(base, tokenizer)

    def render(messages):
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)

    translation = translate(template, render)
    with atomic_directory(output) as tmp:
        size = _write_merged(tmp / OLLAMA_GGUF, merged, tokenizer, arch, quant, base, name)
        atomic_write_text(tmp / MODELFILE, modelfile(OLLAMA_GGUF, translation))
    notes = [f"create the Ollama model with: ollama create NAME -f {output / MODELFILE}"]
    if translation.template is None:
        notes.insert(0, f"the Modelfile has no TEMPLATE: {translation.reason}")
    return ExportResult("ollama", output, output / OLLAMA_GGUF, quant, size, notes)


def _chat_template(base: _Base, tokenizer) -> str | None:
    """The chat template the GGUF carries: the source GGUF's own, else the tokenizer's."""
    if base.gguf is not None:
        import gguf

        field = gguf.GGUFReader(str(base.gguf)).fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        return field.contents() if field is not None else None
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None
