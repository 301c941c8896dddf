"""``adaptune serve``: the base model and many adapters behind an OpenAI/vLLM-compatible API."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a base model and adapters over an OpenAI/vLLM-compatible API",
        description="Serve one base model and many adapters (LoRA, DoRA, prompt/prefix tuning) over HTTP: "
                    "/v1/completions, /v1/chat/completions, /v1/models, a playground at /. Requests for "
                    "different adapters share each batch.")
    p.add_argument("--model", default=None,
                   help="hub id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", type=_adapter_pair, default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as model NAME (repeatable)")
    p.add_argument("--adapter-dir", help="an unknown model name X loads DIR/X on first use (only inside DIR)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 endpoints (or set ADAPTUNE_API_KEY)")
    p.add_argument("--allow-runtime-loading", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter (any local folder may be loaded)")
    p.add_argument("--max-batch", type=_at_least_one, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-loras", type=_at_least_one, default=None,
                   help="LoRA adapters kept loaded; the least recently used idle one goes first (default: no limit)")
    p.add_argument("--max-tokens", type=_at_least_one, default=2048, help="most tokens one completion may ask for")
    p.add_argument("--max-prompt-tokens", type=_at_least_one, default=None,
                   help="longest prompt accepted (default: the model's context length)")
    p.add_argument("--max-queue", type=_at_least_one, default=256, help="requests waiting for a slot before 429")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: --model)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 | auto (default: by hardware; float32 on a CPU)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code that comes with the model (its own modeling files); off by default")
    p.set_defaults(func=cmd_serve)


def options_from_args(args: argparse.Namespace):
    from ..serve.server import ServeOptions

    adapters: dict[str, str] = {}
    for name, folder in args.adapter:
        if name in adapters:
            raise ConfigError(f"--adapter {name}=... is given twice")
        adapters[name] = folder
    return ServeOptions(model=args.model, adapters=adapters, adapter_dir=args.adapter_dir, host=args.host,
                        port=args.port, api_key=args.api_key, allow_runtime_loading=args.allow_runtime_loading,
                        max_batch=args.max_batch, max_loras=args.max_loras, max_tokens=args.max_tokens,
                        max_prompt_tokens=args.max_prompt_tokens, max_waiting=args.max_queue,
                        served_model_name=args.served_model_name, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..serve.server import serve
    except ImportError as exc:
        from ..errors import EnvironmentProblem

        raise EnvironmentProblem(f"adaptune serve needs its extra: pip install 'adaptune[serve]' ({exc})") from None
    serve(options_from_args(args))
    return 0
