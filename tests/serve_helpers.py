"""Shared pieces of the serve tests: tiny adapters of every kind saved to folders, a server state
over a tiny float64 Llama (float64, so that batching's rounding cannot flip a greedy choice and
outputs compare exactly), references from PeftModel, and a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from adaptune import LoraConfig, PeftModel, get_peft_model
from adaptune.config import PrefixTuningConfig, PromptTuningConfig
from adaptune.serve.engine import Delta, Failed, Finished, PromptScored, Request
from adaptune.serve.sampling import SamplingParams
from adaptune.serve.server import ServeOptions, build_state
from tests.tiny import make_tokenizer, nonzero_lora_b, tiny_llama

CONTEXT = 256
PROMPTS = ["the king and the", "love is a", "what is the water of my", "he said that she"]


def base_model() -> torch.nn.Module:
    return tiny_llama(max_position_embeddings=CONTEXT).double()


def _lora(path: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(base_model(), LoraConfig(init_lora_weights=False, **config))
    nonzero_lora_b(model, 0.5)
    model.save_pretrained(path)
    return path


def _prompt(path: Path, seed: int, config) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(base_model(), config)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    model.save_pretrained(path)
    return path


def make_adapters(root: Path) -> dict[str, Path]:
    """name -> folder: LoRA at two ranks and targets, DoRA, prompt tuning, prefix tuning."""
    return {
        "lora_a": _lora(root / "lora_a", 1, r=2),
        "dora_b": _lora(root / "dora_b", 2, r=6, use_dora=True),
        "wide_c": _lora(root / "wide_c", 3, r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]),
        "prompt_p": _prompt(root / "prompt_p", 4, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
        "prefix_x": _prompt(root / "prefix_x", 5, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)),
    }


def state_for(adapters: dict[str, Path], **options):
    options.setdefault("model", "tiny-llama")
    return build_state(ServeOptions(adapters={k: str(v) for k, v in adapters.items()}, **options),
                       model=base_model(), tokenizer=make_tokenizer())


def encode(text: str) -> list[int]:
    return make_tokenizer()(text)["input_ids"]


def reference_model(folder: Path | None):
    model = base_model()
    return PeftModel.from_pretrained(model, folder).eval() if folder is not None else model


def reference_tokens(folder: Path | None, prompt: str, max_new: int) -> list[int]:
    """Greedy tokens from PeftModel.generate for this adapter alone (no early stop at eos)."""
    ids = torch.tensor([encode(prompt)])
    out = reference_model(folder).generate(input_ids=ids, max_new_tokens=max_new, do_sample=False,
                                           pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


class Collect:
    """A request's events, gathered on the engine thread; ``wait()`` until it ends."""

    def __init__(self) -> None:
        self.text, self.tokens, self.logprobs, self.prompt_logprobs = "", [], [], None
        self.reason = self.error = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Delta):
            self.text += event.text
            self.tokens += event.token_ids
            self.logprobs += event.logprobs or []
        elif isinstance(event, PromptScored):
            self.prompt_logprobs = event.logprobs
        elif isinstance(event, Finished):
            self.text += event.text
            self.reason = event.reason
            self.done.set()
        elif isinstance(event, Failed):
            self.error = event.message
            self.done.set()

    def wait(self, timeout: float = 30.0) -> Collect:
        assert self.done.wait(timeout), "the request did not finish in time"
        return self


def submit(state, terms, prompt: str | list[int], **params) -> tuple[Request, Collect]:
    sink = Collect()
    ids = encode(prompt) if isinstance(prompt, str) else prompt
    params.setdefault("temperature", 0.0)
    lease = state.registry.lease(terms)
    request = Request(ids, SamplingParams(**params), lease, sink)
    try:
        state.engine.submit(request)
    except Exception:
        state.registry.release(lease)
        raise
    return request, sink


def free_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0) -> Iterator[str]:
    """A real uvicorn serving ``app`` on 127.0.0.1 at a free port; yields its base URL."""
    import uvicorn

    sock = free_port_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
