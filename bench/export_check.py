"""adaptune export checked by llama.cpp: the table of docs/export.md.

    PYTHONPATH=src:. python bench/export_check.py            # ~10 min on 2 cores
    PYTHONPATH=src:. python bench/export_check.py --tokens 256 --quants f32,q8_0

Needs llama-cpp-python (test-only; see docs/export.md). The embedded SmolLM2-135M-Instruct (Q4_1
GGUF) gets a random LoRA on every linear layer (r=8, alpha=8 as in LoraConfig, A and B drawn with std 0.05). It is
exported as a LoRA GGUF and as a merged GGUF at each --quant; llama.cpp runs each file on three
passages of the bundled Shakespeare (--tokens each), and adaptune runs the same tokens in memory.
Per file:

* top-1 agreement: how often llama.cpp's most likely next token is adaptune's, next to the two
  engines' agreement on the base alone (the LoRA GGUF runs on the source Q4_1 base, where llama.cpp
  rounds activations to 8 bits; a merged file at quant Q is compared with the base exported at Q);
* effect cosine: cosine between the adapter's effect on the logits in each engine (logits with the
  adapter minus logits without, each engine against its own base);
* perplexity of the passage in llama.cpp and in adaptune's merged model in memory.

Also: whether 32 greedy tokens from the f32 merged export equal adaptune's. Results are saved as
bench/results/export-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.llama_oracle import HAVE_LLAMA_CPP, QUANTS, measure_smollm_export  # noqa: E402


def table(result: dict) -> str:
    lines = ["| format | quant | llama.cpp base | file size | top-1 agreement (base alone) | effect cosine "
             "| perplexity llama.cpp / in memory |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['format']} | {r['quant']} | {r['llama_cpp_base']} | {r['size_bytes'] / 2**20:.1f} MiB "
                     f"| {100 * r['top1']:.1f}% ({100 * r['base_top1']:.1f}%) | {r['effect_cosine']:.4f} "
                     f"| {r['ppl_llama_cpp']:.3f} / {r['ppl_adaptune']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--quants", default=",".join(QUANTS))
    parser.add_argument("--workdir", default=None, help="where the GGUF files go (default: a temporary folder)")
    args = parser.parse_args()
    if not HAVE_LLAMA_CPP:
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="export-check-", dir=args.workdir) as tmp:
        result = measure_smollm_export(Path(tmp), quants=tuple(args.quants.split(",")), n_tokens=args.tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result.update(commit=commit.strip(), date=time.strftime("%Y-%m-%d"), machine=_machine())
    print(table(result))
    greedy = result["greedy"]
    same = greedy["llama_cpp"] == greedy["adaptune"]
    print(f"\ngreedy {len(greedy['adaptune'])} tokens from the f32 merged export equal adaptune's: {same}")
    print(f"{result['passages']} passages, {result['tokens']} tokens; seconds per step: {result['seconds']}; "
          f"commit {result['commit']}")
    out = ROOT / "bench" / "results" / f"export-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out.relative_to(ROOT)}")
    return 0


def _machine() -> str:
    import platform

    import llama_cpp

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, llama-cpp-python {llama_cpp.__version__}"


if __name__ == "__main__":
    sys.exit(main())
