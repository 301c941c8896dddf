"""Tiny bases and adapters for the export tests: a byte-level BPE tokenizer (llama.cpp reads BPE, not
the word-level tokenizer of tests/tiny.py), saved model folders and saved LoRA adapters."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch

from tests.tiny import WORDS, tiny_gpt2, tiny_llama

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@functools.lru_cache(maxsize=1)
def _bpe_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    tk.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(200)], trainer)
    return tk.to_str()


def bpe_tokenizer():
    """A GPT-2 style byte-level BPE tokenizer of 320 tokens with a ChatML chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json()), bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def _tiny_qwen2_or_mistral(kind: str, seed: int, **ids):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (MistralConfig, MistralForCausalLM)
    config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=kind == "qwen2", **ids)
    return model_cls(config).eval()


# Llama 3.1's long-context rope, with an original context short enough for the test sequences to use it
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_base(kind: str = "llama", seed: int = 0):
    """A tiny random model of ``kind`` (llama, llama3 (Llama 3.1 rope), gpt2, qwen2, mistral) with the BPE
    tokenizer's vocabulary."""
    tok = bpe_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama3":
        return tiny_llama(seed, rope_parameters=dict(LLAMA3_ROPE), **ids), tok
    if kind in ("qwen2", "mistral"):
        return _tiny_qwen2_or_mistral(kind, seed, **ids), tok
    model = tiny_llama(seed, **ids) if kind == "llama" else tiny_gpt2(seed, **ids)
    return model, tok


def save_base(folder: Path, kind: str = "llama") -> Path:
    model, tok = tiny_base(kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_adapter(folder: Path, base_folder: Path, std: float = 0.3, seed: int = 1, **lora) -> Path:
    """A LoRA adapter on the base saved in ``base_folder``, with random A and B (a real effect)."""
    from adaptune import LoraConfig, get_peft_model
    from adaptune.hub import load_model

    model = load_model(str(base_folder), device="cpu", dtype="float32")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}
    pm = get_peft_model(model, LoraConfig(**lora))
    torch.manual_seed(seed)
    with torch.no_grad():  # A and B (embeddings start with a zero A) drawn at random: a real effect
        for name, p in pm.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.normal_(0.0, std)
    pm.save_pretrained(folder)
    _set_base(folder, base_folder)
    return folder


def _set_base(adapter: Path, base: Path | str) -> None:
    path = adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(data))
