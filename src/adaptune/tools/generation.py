"""Text in, text out: chat template when the model has one, tokens streamed as they come."""

from __future__ import annotations

from typing import Any

import torch


def build_inputs(tokenizer: Any, prompt: str, chat: bool | None = None) -> dict[str, torch.Tensor]:
    """Token ids for ``prompt``; ``chat=None`` uses the chat template when the tokenizer has one."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    return tokenizer(prompt, return_tensors="pt")


def generate_text(model: Any, tokenizer: Any, prompt: str, *, chat: bool | None = None, stream: bool = False,
                  max_new_tokens: int = 64, do_sample: bool = True, temperature: float = 0.7,
                  top_p: float = 0.9, top_k: int | None = None, repetition_penalty: float | None = None,
                  no_repeat_ngram_size: int | None = None, seed: int | None = None) -> str:
    """Generate a continuation of ``prompt`` and return only the new text."""
    from transformers import TextStreamer

    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in build_inputs(tokenizer, prompt, chat).items()}
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
        if top_k is not None:
            kwargs["top_k"] = top_k
    if repetition_penalty is not None:
        kwargs["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**inputs, **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
