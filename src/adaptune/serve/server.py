"""Putting a server together: the base model, its adapters, the engine, the app; and running it."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from .engine import Engine
from .handlers import ServeState
from .metrics import ServeMetrics
from .registry import Registry, check_name
from .schemas import Limits

logger = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    """``adaptune serve``'s options (the CLI's flags, by the same names)."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder
    adapter_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_runtime_loading: bool = False
    max_batch: int = 16
    max_loras: int | None = None
    max_tokens: int = 2048
    max_prompt_tokens: int | None = None
    max_waiting: int = 256
    served_model_name: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False

    def check(self) -> None:
        for name in self.adapters:
            check_name(name)
        if self.max_batch < 1 or self.max_tokens < 1 or self.max_waiting < 1:
            raise ConfigError("--max-batch, --max-tokens and --max-queue must be at least 1")
        if self.max_loras is not None and self.max_loras < 1:
            raise ConfigError("--max-loras must be at least 1")
        if self.max_loras is not None and len(self.adapters) > self.max_loras:
            raise ConfigError(f"{len(self.adapters)} adapters given but --max-loras is {self.max_loras}")
        if self.adapter_dir is not None and not Path(self.adapter_dir).is_dir():
            raise ConfigError(f"--adapter-dir {self.adapter_dir}: no such folder")


def base_identity(options: ServeOptions) -> tuple[str, str]:
    """(the name clients use for the base model, where it comes from)."""
    from ..hub import DEFAULT_MODEL, default_gguf_path, names_embedded_default

    if options.model is None or names_embedded_default(options.model):
        root = str(default_gguf_path())
        return options.served_model_name or DEFAULT_MODEL.split(" (")[0], root
    return options.served_model_name or options.model, options.model


def context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_state(options: ServeOptions, model: nn.Module | None = None, tokenizer=None) -> ServeState:
    """The engine and registry over ``model`` (loaded from ``options.model`` when not given)."""
    options.check()
    if model is None or tokenizer is None:
        from ..hub import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(options.model, dtype=options.dtype,
                                                    trust_remote_code=options.trust_remote_code)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    lock = threading.RLock()
    registry = Registry(model, lock, max_loras=options.max_loras, adapter_dir=options.adapter_dir)
    for name, folder in options.adapters.items():
        registry.load(name, folder)
    limits = Limits(options.max_tokens, options.max_prompt_tokens, options.max_waiting)
    engine = Engine(model, tokenizer, registry, ServeMetrics(), max_batch=options.max_batch,
                    max_waiting=options.max_waiting)
    name, root = base_identity(options)
    if name in options.adapters:
        raise ConfigError(f"adapter name {name!r} is the base model's name")
    api_key = options.api_key or os.environ.get("ADAPTUNE_API_KEY") or None
    return ServeState(engine, registry, tokenizer, limits, name, root, context_length(model),
                      options.allow_runtime_loading, api_key)


def build_app(options: ServeOptions, model: nn.Module | None = None, tokenizer=None):
    from .api import create_app

    return create_app(build_state(options, model, tokenizer))


def serve(options: ServeOptions) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = build_app(options)
    state = app.state.serve
    if options.host not in LOCAL_HOSTS and not state.api_key:
        logger.warning("listening on %s without --api-key: anyone who can reach this address can use the "
                       "server", options.host)
    print(f"adaptune serve: {state.base_name} with {len(state.registry.names())} adapter(s) on "
          f"http://{options.host}:{options.port} (playground at /, API at /v1)", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")
