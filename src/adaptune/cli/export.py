"""``adaptune export``: an adapter as a llama.cpp LoRA GGUF, a merged GGUF, or a GGUF + Ollama Modelfile."""

from __future__ import annotations

import argparse

FORMATS = ("gguf-lora", "gguf", "ollama")
QUANTS = ("f32", "f16", "bf16", "q8_0", "source")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export an adapter for llama.cpp / Ollama (LoRA GGUF, merged GGUF, Modelfile)",
        description="Write an adapter as a llama.cpp LoRA GGUF (--format gguf-lora), the merged model as one "
                    "self-contained GGUF (--format gguf), or that GGUF plus an Ollama Modelfile (--format ollama).")
    p.add_argument("--adapter", required=True, help="adapter folder (peft format, LoRA)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True,
                   help="the .gguf file to write (gguf-lora, gguf) or the folder (ollama)")
    p.add_argument("--model", default=None,
                   help="the base: hub id, folder or .gguf file (default: the one the adapter was trained on)")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="tensor type: f32, f16, bf16, q8_0, or source (a GGUF base's own types, e.g. Q4_1; "
                        "re-rounds the merged weights). Default: f32 for gguf-lora, q8_0 for gguf and ollama")
    p.add_argument("--check", action="store_true",
                   help="read the merged GGUF back with transformers and compare logits and perplexity with "
                        "the merged model in memory; fail past the quant type's tolerance")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read an adapter stored only as pickled adapter_model.bin (with weights_only=True)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code that comes with the model (its own modeling files); off by default")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.api import export

    result = export(args.adapter, args.format, args.output, model=args.model, quant=args.quant, check=args.check,
                    overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code)
    print(f"wrote {result.gguf_path} ({result.format}, {result.quant}, {result.size_bytes / 2**20:.1f} MiB)")
    for note in result.notes:
        print(note)
    if result.check is not None:
        print(result.check.line())
    return 0
