"""vLLM-CPU's half of bench/serve.py, run in vLLM's own virtual environment (it pins its own
transformers): the offline ``LLM`` with ``enable_lora``, the same base folder, adapters and prompts.

    /work/venvs/vllm/bin/python bench/serve_vllm.py --work DIR --workloads identical,distinct

Prints one ``RESULT {json}`` line with, per workload, tokens/s, time to first token and time per
output token (from vLLM's own request stats) and the generated tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (standard library only at import)
from serve import CONCURRENCY, N_ADAPTERS, assignments, summarize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--workloads", required=True)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    work = Path(args.work)
    prompts = json.loads((work / "prompts.json").read_text())[:args.requests]
    llm = LLM(model=str(work / "base"), enable_lora=True, max_loras=N_ADAPTERS, max_lora_rank=8, dtype="float32",
              max_num_seqs=CONCURRENCY, max_model_len=256, gpu_memory_utilization=0.08, disable_log_stats=False,
              enforce_eager=True, seed=0)
    loras = {f"a{i}": LoRARequest(f"a{i}", i + 1, str(work / f"a{i}")) for i in range(N_ADAPTERS)}

    def generate(batch, names, new_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        requests = [loras[n] if n else None for n in names]
        start = time.time()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, lora_request=requests, use_tqdm=False)
        return outs, time.time() - start

    generate(prompts[:N_ADAPTERS], list(loras), 4)  # warm-up: every adapter into its slot
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for workload in args.workloads.split(","):
            outs, wall = generate(prompts, assignments(workload, len(prompts)), args.new_tokens)
            timings = []
            for out in outs:
                m = out.metrics  # vLLM's request stats: first/last token times on one clock, latency from arrival
                arrival = m.first_token_ts - m.first_token_latency
                timings.append((arrival, m.first_token_ts, m.last_token_ts, m.num_generation_tokens))
            run = {**summarize(timings, wall), "outputs": [list(o.outputs[0].token_ids) for o in outs]}
            best = results.get(workload)
            all_tok_s = (best or {}).get("all_tok_s", []) + [run["tok_s"]]
            results[workload] = {**(run if best is None or run["tok_s"] > best["tok_s"] else best),
                                 "all_tok_s": all_tok_s}
    common.emit({"tool": "vllm", "results": results})


if __name__ == "__main__":
    main()
