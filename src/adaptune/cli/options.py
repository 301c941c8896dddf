"""What the commands share: number checks for flags, the model/adapter/sampling flags, and loading a
base (with its adapter) for inference."""

from __future__ import annotations

import argparse


def number_type(kind: type, low: float, inclusive: bool, what: str, high: float = float("inf")):
    """An argparse type: ``kind`` (int/float) at or above ``low`` (or above, if not ``inclusive``)
    and at most ``high``; NaN and infinities are refused."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        finite = value == value and value not in (float("inf"), float("-inf"))
        if not finite or value < low or (value == low and not inclusive) or value > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE_INT = number_type(int, 1, True, "a positive integer")
COUNT = number_type(int, 0, True, "an integer >= 0")
POSITIVE = number_type(float, 0, False, "a positive number")


def add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    add_trust_flag(p)


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code that comes with the model (its own modeling files); off by default")


def add_pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="read an adapter stored only as pickled adapter_model.bin (with "
                        "torch.load(weights_only=True)); off by default: only safetensors are read")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    p.add_argument("--temperature", type=POSITIVE, default=0.7, help="sampling temperature (> 0; --greedy for none)")
    p.add_argument("--top-p", type=number_type(float, 0, False, "a number in (0, 1]", high=1.0), default=0.9)
    p.add_argument("--top-k", type=POSITIVE_INT, default=None)
    p.add_argument("--repetition-penalty", type=POSITIVE, default=None)
    p.add_argument("--no-repeat-ngram-size", type=POSITIVE_INT, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=None)


def load_for_inference(model_name: str | None, adapter: str | None, allow_pickle: bool = False,
                        trust_remote_code: bool = False):
    """Base (+ adapter) ready for generation or evaluation; the base defaults to the adapter's."""
    from ..hub import load_model_and_tokenizer
    from ..peft_model import PeftModel

    if adapter and model_name is None:
        model_name = adapter_base_name(adapter)
    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code=trust_remote_code)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, allow_pickle=allow_pickle)
    model.eval()
    return model, tokenizer


def adapter_base_name(adapter: str) -> str | None:
    """The base an adapter was trained on, when it is a usable name (else the default model)."""
    from ..config import PeftConfig
    from ..hub import names_embedded_default

    name = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    return None if not name or names_embedded_default(name) else name
