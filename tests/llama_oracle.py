"""llama.cpp (through llama-cpp-python) as the oracle for exported GGUF files, and the measures used
to compare it with adaptune: top-1 agreement, adapter-effect cosine, perplexity.

Test-only: llama-cpp-python is not a dependency of adaptune. Tests that use it are marked
``llama_cpp`` and skipped when it is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _llama(model_path: str | Path, lora_path: str | Path | None, n_ctx: int):
    from llama_cpp import Llama

    return Llama(str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=n_ctx, n_batch=n_ctx,
                 n_ubatch=n_ctx, logits_all=True, verbose=False, seed=0,
                 n_threads=int(os.environ.get("LLAMA_THREADS", min(4, os.cpu_count() or 1))))


def llama_logits(model_path: str | Path, ids: list[int] | list[list[int]],
                 lora_path: str | Path | None = None) -> np.ndarray:
    """llama.cpp's logits (tokens, vocab) for ``ids`` (no BOS added), with an optional LoRA GGUF.

    ``ids`` may be several passages (a list of lists): each is run from an empty cache and their
    logits are stacked."""
    passages = ids if ids and isinstance(ids[0], list) else [ids]
    llm = _llama(model_path, lora_path, n_ctx=max(64, max(len(p) for p in passages) + 8))
    try:
        out = []
        for passage in passages:
            llm.reset()
            llm.eval(list(passage))
            out.append(np.array(llm.scores[:len(passage)], dtype=np.float32))
        return np.concatenate(out)
    finally:
        llm.close()


def llama_greedy(model_path: str | Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by llama.cpp: argmax of the raw logits, one token at a time."""
    llm = _llama(model_path, None, n_ctx=len(prompt) + new_tokens + 8)
    try:
        llm.reset()
        llm.eval(list(prompt))
        out = []
        for _ in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
        return out
    finally:
        llm.close()


def as_array(logits) -> np.ndarray:
    return logits.detach().float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)


def top1_agreement(a, b) -> float:
    a, b = as_array(a), as_array(b)
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def effect_cosine(adapted_a, base_a, adapted_b, base_b) -> float:
    """Cosine between two engines' adapter effects (logits with minus logits without, each engine
    against its own base)."""
    x = (as_array(adapted_a) - as_array(base_a)).ravel().astype(np.float64)
    y = (as_array(adapted_b) - as_array(base_b)).ravel().astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def perplexity(logits, ids: list[int] | list[list[int]]) -> float:
    """exp(mean next-token cross-entropy) of ``ids`` under ``logits``; for several passages (stacked
    logits, as :func:`llama_logits` gives them) the mean over all their predicted tokens."""
    passages = ids if ids and isinstance(ids[0], list) else [ids]
    x = torch.from_numpy(as_array(logits)).double()
    losses, start = [], 0
    for passage in passages:
        rows = x[start:start + len(passage)]
        losses.append(torch.nn.functional.cross_entropy(rows[:-1], torch.tensor(passage[1:]), reduction="sum"))
        start += len(passage)
    return math.exp(float(sum(losses)) / sum(len(p) - 1 for p in passages))


# ---- the measurement on the real SmolLM2-135M (tests and bench/export_check.py) -------------
QUANTS = ("f32", "f16", "bf16", "q8_0", "source")
# Three passages spread over the bundled Shakespeare (about 1 MB): top-1 agreement between two
# engines moves by about 3 points from one 512-token passage to another, more than the 2-point
# margin the checks allow, so they are measured on three.
PASSAGE_OFFSETS = (0, 333_000, 666_000)


def random_lora(model, r: int = 8, alpha: float = 8, std: float = 0.05, seed: int = 0, **extra):
    """A LoRA on every linear layer with A and B drawn from N(0, std): a real, known-size effect."""
    from adaptune import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return pm.eval()


@torch.no_grad()
def torch_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation in transformers: argmax of the raw logits, with the KV cache."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens


def sample_passages(tokenizer, n_tokens: int, offsets=PASSAGE_OFFSETS) -> list[list[int]]:
    """``n_tokens`` ids of the bundled Shakespeare from each character offset."""
    from adaptune.data import default_data_path

    text = default_data_path().read_text(encoding="utf-8")
    return [tokenizer(text[o:o + 20 * n_tokens], add_special_tokens=False)["input_ids"][:n_tokens] for o in offsets]


def torch_logits(model, passages: list[list[int]]) -> torch.Tensor:
    from adaptune.export.check import logits_of

    return torch.cat([logits_of(model, torch.tensor([p])) for p in passages])


def measure_smollm_export(workdir: Path, quants=QUANTS, n_tokens: int = 512, new_tokens: int = 32,
                          lora: dict | None = None) -> dict:
    """Export a random all-linear LoRA on the embedded SmolLM2-135M as a LoRA GGUF and as merged GGUFs
    at each quant, run every file in llama.cpp, and compare with adaptune's in-memory models.

    Returns one row per file (format, quant, the base llama.cpp ran it against, size, top-1 agreement
    with adaptune, the two engines' agreement on that base alone, adapter-effect cosine, perplexity in
    llama.cpp and in adaptune), the greedy continuations of the f32 merged export and of adaptune,
    and the seconds each step took."""
    import copy
    import time

    from adaptune.export import export
    from adaptune.export.gguf_merged import write_merged_gguf
    from adaptune.export.names import ARCHS
    from adaptune.hub import default_gguf_path, load_model_and_tokenizer

    workdir = Path(workdir)
    source = default_gguf_path()
    clock = {"start": time.perf_counter()}
    base, tok = load_model_and_tokenizer(None, device="cpu", dtype="float32")
    base.eval()
    clock["load"] = time.perf_counter()
    pm = random_lora(copy.deepcopy(base), **(lora or {}))
    pm.save_pretrained(workdir / "adapter")
    ids = sample_passages(tok, n_tokens)
    ours_base, ours_adapted = torch_logits(base, ids), torch_logits(pm, ids)
    prompt = ids[0][:24]
    ours_greedy = torch_greedy(pm, prompt, new_tokens)
    merged = pm.merge_and_unload()
    del pm
    clock["adaptune"] = time.perf_counter()

    rows = []
    lora_path = workdir / "adapter.gguf"
    export(workdir / "adapter", "gguf-lora", lora_path, overwrite=True)
    rows.append(_row("gguf-lora", "f32", "source Q4_1", lora_path, llama_logits(source, ids, lora_path),
                     llama_logits(source, ids), ours_adapted, ours_base, ids))
    # control: the same LoRA GGUF on an f32 export of the base, where llama.cpp does not round activations
    base32 = workdir / "base-f32.gguf"
    write_merged_gguf(base32, base, tok, ARCHS["llama"], "f32", source_gguf=source)
    rows.append(_row("gguf-lora", "f32", "f32 export", lora_path, llama_logits(base32, ids, lora_path),
                     llama_logits(base32, ids), ours_adapted, ours_base, ids))
    clock["lora"] = time.perf_counter()
    greedy = None
    for quant in quants:
        path = workdir / f"merged-{quant}.gguf"
        write_merged_gguf(path, merged, tok, ARCHS["llama"], quant, source_gguf=source)
        base_path = source if quant == "source" else workdir / f"base-{quant}.gguf"
        if not base_path.exists():
            write_merged_gguf(base_path, base, tok, ARCHS["llama"], quant, source_gguf=source)
        base_label = "source Q4_1" if quant == "source" else f"{quant} export"
        rows.append(_row("gguf", quant, base_label, path, llama_logits(path, ids), llama_logits(base_path, ids),
                         ours_adapted, ours_base, ids))
        if quant == "f32":
            greedy = {"prompt": prompt, "llama_cpp": llama_greedy(path, prompt, new_tokens), "adaptune": ours_greedy}
        for p in {path, base_path} - {source}:
            p.unlink()
        clock[f"merged-{quant}"] = time.perf_counter()
    steps = list(clock)
    seconds = {b: round(clock[b] - clock[a], 1) for a, b in zip(steps, steps[1:])}
    return {"rows": rows, "greedy": greedy, "tokens": sum(len(p) for p in ids), "passages": len(ids),
            "seconds": seconds}


def _row(fmt, quant, base, path, theirs, theirs_base, ours, ours_base, ids) -> dict:
    return {"format": fmt, "quant": quant, "llama_cpp_base": base, "size_bytes": Path(path).stat().st_size,
            "top1": top1_agreement(theirs, ours), "base_top1": top1_agreement(theirs_base, ours_base),
            "effect_cosine": effect_cosine(theirs, theirs_base, ours, ours_base),
            "ppl_llama_cpp": perplexity(theirs, ids), "ppl_adaptune": perplexity(ours, ids)}
