"""Serving many adapters: adaptune's engine against peft and vLLM-CPU, in one run.

    python bench/serve.py                  # ~5 min on 2 busy cores
    python bench/serve.py --tools adaptune,vllm --requests 16

SmolLM2-135M-Instruct (the embedded one, fp32, saved once as a plain folder that every tool
loads), 8 LoRA adapters (r=8, alpha=16 on q_proj and v_proj, random non-zero B) saved in peft's
format, 32-token prompts cut from the embedded Shakespeare, 64 new tokens each (EOS ignored),
greedy. Every workload sends ``--requests`` requests at once to a server that runs at most 8
(concurrency 8); time to first token therefore includes the wait for a free slot.

Workloads (Punica's): identical (every request uses adapter 0), distinct (request i uses adapter
i mod 8), skewed (Zipf, exponent 1.5, over the 8 adapters), base (no adapter).

Tools, each in a child process of its own:
- adaptune: the ``adaptune serve`` engine in process (continuous batching, mixed adapters);
- adaptune-http: the same behind uvicorn on 127.0.0.1, driven by the ``openai`` client (streaming);
- peft-sequential: peft, ``set_adapter`` and ``generate`` one request at a time (S-LoRA's baseline);
- peft-mixed: peft's mixed batch (``adapter_names``) through transformers' ``generate``, 8 at a time;
- merged: adapter 0 merged into the base (``merge_and_unload``), ``generate`` 8 at a time;
- vllm: vLLM-CPU's offline ``LLM`` with ``enable_lora`` (bench/serve_vllm.py, in the virtual
  environment ``--vllm-python``; skipped when that interpreter is missing).

Reported per tool and workload: output tokens/s, p50/p95 time to first token and time per
output token, and the share of requests whose tokens equal adaptune's. Then the ratios for the
goals: distinct >= 0.85x identical, >= 5x peft one at a time, LoRA <= 15 % over base only, and
against vLLM-CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

N_ADAPTERS = 8
CONCURRENCY = 8
WORKLOADS = ("identical", "distinct", "skewed", "base")
TOOL_WORKLOADS = {
    "adaptune": WORKLOADS,
    "adaptune-http": ("distinct",),
    "peft-sequential": ("distinct",),
    "peft-mixed": ("identical", "distinct", "base"),
    "merged": ("identical",),
    "vllm": WORKLOADS,
}
VLLM_PYTHON = "/work/venvs/vllm/bin/python"


# ---- the setup every tool shares ------------------------------------------------------------------
def prepare(work: Path, prompt_tokens: int, n_prompts: int) -> None:
    """The base as a plain folder, the adapters, and the prompts (token ids), written to ``work``."""
    import torch

    from adaptune import LoraConfig, get_peft_model

    model, tok = common.load_smollm2()
    model.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    for i in range(N_ADAPTERS):
        torch.manual_seed(i)
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **{**common.LORA, "lora_dropout": 0.0}),
                                    adapter_name=f"a{i}")
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        peft_model.save_pretrained(work / "tmp")
        (work / "tmp" / f"a{i}").rename(work / f"a{i}")
        model = peft_model.unload()
    ids = tok(" ".join(common.shakespeare_words()[:20000]))["input_ids"]
    prompts = [ids[i * 97:i * 97 + prompt_tokens] for i in range(n_prompts)]
    (work / "prompts.json").write_text(json.dumps(prompts))


def assignments(workload: str, n: int) -> list[str | None]:
    if workload == "identical":
        return ["a0"] * n
    if workload == "distinct":
        return [f"a{i % N_ADAPTERS}" for i in range(n)]
    if workload == "skewed":
        weights = [1 / (k + 1) ** 1.5 for k in range(N_ADAPTERS)]
        return random.Random(0).choices([f"a{i}" for i in range(N_ADAPTERS)], weights, k=n)
    return [None] * n


def summarize(timings: list[tuple[float, float, float, int]], wall: float) -> dict:
    """timings: (arrival, first token, last token, tokens) per request, in seconds."""
    tokens = sum(t[3] for t in timings)
    ttft = [first - arrival for arrival, first, _, _ in timings]
    tpot = [(last - first) / (n - 1) for _, first, last, n in timings if n > 1]
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": _pct(ttft, 50),
            "ttft_p95": _pct(ttft, 95), "tpot_p50": _pct(tpot, 50), "tpot_p95": _pct(tpot, 95)}


def _pct(values: list[float], q: int) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# ---- children: each tool is set up once, then serves every workload ``--repeats`` times in turn ---------
Served = tuple[list[tuple[float, float, float, int]], float, list[list[int]]]  # timings, wall, tokens


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    prompts = json.loads((work / "prompts.json").read_text())[:args.requests]
    if args.tool == "peft-sequential":
        prompts = prompts[:args.sequential_requests]
    serve = SETUPS[args.tool](work, args)
    results: dict[str, dict] = {}
    for _ in range(args.repeats):  # workloads in turn, so that each meets the machine's moods alike
        for workload in args.workloads.split(","):
            timings, wall, outputs = serve(prompts, assignments(workload, len(prompts)), args.new_tokens)
            run = {**summarize(timings, wall), "outputs": outputs}
            best = results.get(workload)
            all_tok_s = (best or {}).get("all_tok_s", []) + [run["tok_s"]]
            if best is None or run["tok_s"] > best["tok_s"]:
                best = run
            results[workload] = {**best, "all_tok_s": all_tok_s}
    common.emit({"tool": args.tool, "threads": torch.get_num_threads(), "results": results})


def _base(work: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(work / "base")


def _adaptune_state(work: Path):
    from adaptune.serve.server import ServeOptions, build_state

    model, tok = _base(work)
    adapters = {f"a{i}": str(work / f"a{i}") for i in range(N_ADAPTERS)}
    return build_state(ServeOptions(model=str(work / "base"), adapters=adapters, max_batch=CONCURRENCY), model, tok)


def setup_adaptune(work: Path, args):
    from adaptune.serve.engine import Delta, Finished, Request
    from adaptune.serve.sampling import SamplingParams

    state = _adaptune_state(work)
    state.engine.start()

    def serve(prompts, names, new_tokens) -> Served:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        done = threading.Semaphore(0)
        records = [{"first": None, "last": None, "tokens": []} for _ in prompts]

        def sink_for(record):
            def sink(event):
                now = time.perf_counter()
                if isinstance(event, Delta):
                    record["first"] = record["first"] or now
                    record["tokens"] += event.token_ids
                elif isinstance(event, Finished):
                    record["last"] = now
                    done.release()
                else:
                    raise RuntimeError(event)
            return sink

        start = time.perf_counter()
        for ids, name, record in zip(prompts, names, records):
            lease = state.registry.lease([] if name is None else [(name, 1.0)])
            state.engine.submit(Request(ids, params, lease, sink_for(record)))
        for _ in records:
            done.acquire()
        wall = time.perf_counter() - start
        return [(start, r["first"], r["last"], len(r["tokens"])) for r in records], wall, [r["tokens"] for r in records]

    serve(json.loads((work / "prompts.json").read_text())[:N_ADAPTERS], [f"a{i}" for i in range(N_ADAPTERS)], 4)
    return serve


def setup_adaptune_http(work: Path, args):
    from concurrent.futures import ThreadPoolExecutor

    import openai
    import uvicorn

    from adaptune.serve.api import create_app

    state = _adaptune_state(work)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def ask(ids, name, new_tokens):
        first = last = None
        stream = client.completions.create(model=name or state.base_name, prompt=ids, max_tokens=new_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            last = time.perf_counter()
            if chunk.choices and chunk.choices[0].text and first is None:
                first = last
        return first, last

    def serve(prompts, names, new_tokens) -> Served:
        with ThreadPoolExecutor(len(prompts)) as pool:
            start = time.perf_counter()
            spans = list(pool.map(ask, prompts, names, [new_tokens] * len(prompts)))
            wall = time.perf_counter() - start
        return [(start, first, last, new_tokens) for first, last in spans], wall, []

    serve(json.loads((work / "prompts.json").read_text())[:N_ADAPTERS], [f"a{i}" for i in range(N_ADAPTERS)], 4)
    return serve


class _Clock:
    """A transformers streamer that only notes when tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _peft(work: Path):
    from peft import PeftModel

    base, _ = _base(work)
    model = PeftModel.from_pretrained(base, work / "a0", adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        model.load_adapter(work / f"a{i}", adapter_name=f"a{i}")
    return model.eval()


def _generate(model, ids, new_tokens: int, **kwargs):
    import torch

    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(len(ids), len(ids[0]),
                             dtype=torch.long), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=2, streamer=clock, **kwargs)
    return out[:, len(ids[0]):].tolist(), clock.times[1], clock.times[-1]


def setup_peft_sequential(work: Path, args):
    model = _peft(work)

    def serve(prompts, names, new_tokens) -> Served:
        timings, outputs = [], []
        start = time.perf_counter()
        for ids, name in zip(prompts, names):
            if name is None:
                with model.disable_adapter():
                    tokens, first, last = _generate(model, [ids], new_tokens)
            else:
                model.set_adapter(name)
                tokens, first, last = _generate(model, [ids], new_tokens)
            timings.append((start, first, last, len(tokens[0])))
            outputs += tokens
        return timings, time.perf_counter() - start, outputs

    serve(json.loads((work / "prompts.json").read_text())[:2], ["a0", "a1"], 4)
    return serve


def _in_batches(model, use_names: bool):
    def serve(prompts, names, new_tokens) -> Served:
        timings, outputs = [], []
        start = time.perf_counter()
        for k in range(0, len(prompts), CONCURRENCY):  # static batches: the next starts when all are done
            batch, batch_names = prompts[k:k + CONCURRENCY], names[k:k + CONCURRENCY]
            extra = {"adapter_names": [n or "__base__" for n in batch_names]} if use_names else {}
            tokens, first, last = _generate(model, batch, new_tokens, **extra)
            timings += [(start, first, last, len(t)) for t in tokens]
            outputs += tokens
        return timings, time.perf_counter() - start, outputs

    return serve


def setup_peft_mixed(work: Path, args):
    serve = _in_batches(_peft(work), use_names=True)
    serve(json.loads((work / "prompts.json").read_text())[:2], ["a0", "a1"], 4)
    return serve


def setup_merged(work: Path, args):
    from peft import PeftModel

    base, _ = _base(work)
    serve = _in_batches(PeftModel.from_pretrained(base, work / "a0").merge_and_unload().eval(), use_names=False)
    serve(json.loads((work / "prompts.json").read_text())[:2], [None, None], 4)
    return serve


SETUPS = {"adaptune": setup_adaptune, "adaptune-http": setup_adaptune_http, "peft-sequential": setup_peft_sequential,
          "peft-mixed": setup_peft_mixed, "merged": setup_merged}


# ---- the parent -------------------------------------------------------------------------------------
def run_vllm(work: Path, workloads: list[str], args) -> dict:
    python = args.vllm_python
    if not Path(python).exists():
        return {"error": f"{python} not found (vLLM-CPU lives in its own virtual environment)"}
    threads = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    cmd = [python, str(common.ROOT / "bench" / "serve_vllm.py"), "--work", str(work), "--workloads",
           ",".join(workloads), "--requests", str(args.requests), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=threads, OMP_NUM_THREADS=str(args.threads),
               VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=str(work))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"exit {proc.returncode}", "tail": (proc.stderr or proc.stdout).strip().splitlines()[-15:]}


def parent(args: argparse.Namespace) -> None:
    tools = args.tools.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        prepare(work, args.prompt_tokens, max(args.requests, N_ADAPTERS))
        results = {}
        for tool in tools:
            workloads = [w for w in TOOL_WORKLOADS[tool] if w in args.workloads.split(",")]
            if not workloads:
                continue
            print(f"running {tool}: {', '.join(workloads)}", flush=True)
            if tool == "vllm":
                results[tool] = run_vllm(work, workloads, args)
                continue
            extra = ["--tool", tool, "--work", str(work), "--workloads", ",".join(workloads)] + _shared_flags(args)
            results[tool] = common.run_child("serve.py", extra, timeout=1800, quiet_wait=args.wait_quiet)
    report(results, args)


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--requests", str(args.requests), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
            "--sequential-requests", str(args.sequential_requests), "--repeats", str(args.repeats)]


def _same_as_adaptune(results: dict, tool: str, workload: str) -> str:
    ours = results.get("adaptune", {}).get("results", {}).get(workload, {}).get("outputs")
    theirs = results[tool]["results"][workload].get("outputs")
    if not ours or not theirs or tool == "adaptune":
        return ""
    pairs = list(zip(ours, theirs))
    return f"{sum(a == b for a, b in pairs)}/{len(pairs)}"


def report(results: dict, args: argparse.Namespace) -> None:
    rows = []
    for tool, res in results.items():
        if "error" in res:
            rows.append([tool, "-", "error: " + res["error"]])
            print(f"{tool}: {res['error']}", *res.get("tail", [])[-5:], sep="\n  ")
            continue
        for workload, r in res["results"].items():
            rows.append([tool, workload, f"{r['tok_s']:.1f}", f"{r['ttft_p50']:.2f}", f"{r['ttft_p95']:.2f}",
                         f"{r['tpot_p50'] * 1e3:.0f}", f"{r['tpot_p95'] * 1e3:.0f}",
                         _same_as_adaptune(results, tool, workload)])
    print(f"\nSmolLM2-135M fp32, {N_ADAPTERS} LoRA adapters r=8 (q,v), {args.requests} requests at once, "
          f"concurrency {CONCURRENCY}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, "
          f"{args.threads} thread(s); load {common.load_average()}")
    print(common.table(rows, ["tool", "workload", "tok/s", "TTFT p50 s", "TTFT p95 s", "TPOT p50 ms",
                              "TPOT p95 ms", "same tokens as adaptune"]))
    ratios = goals(results)
    for line in ratios:
        print(line)
    path = common.save("serve", {"args": vars(args), "results": _without_outputs(results), "goals": ratios,
                                 "load": common.load_average()})
    print(f"saved {path}")


def _tok_s(results: dict, tool: str, workload: str) -> float | None:
    return results.get(tool, {}).get("results", {}).get(workload, {}).get("tok_s")


def goals(results: dict) -> list[str]:
    lines = []

    def ratio(label, a, b, goal=None, higher=True):
        if a is None or b is None:
            lines.append(f"{label}: not measured")
            return
        value = a / b
        verdict = "" if goal is None else ("  (goal met)" if (value >= goal if higher else value <= goal)
                                           else "  (goal missed)")
        lines.append(f"{label}: {value:.2f}{verdict}")

    ours = {w: _tok_s(results, "adaptune", w) for w in WORKLOADS}
    ratio("adaptune distinct / identical (goal >= 0.85)", ours["distinct"], ours["identical"], 0.85)
    ratio("adaptune distinct / peft one at a time (goal >= 5)", ours["distinct"],
          _tok_s(results, "peft-sequential", "distinct"), 5.0)
    if ours["base"] and ours["identical"]:
        ratio("adaptune LoRA cost: base-only / identical (goal <= 1.15)", ours["base"], ours["identical"], 1.15,
              higher=False)
    ratio("adaptune distinct / peft mixed batch", ours["distinct"], _tok_s(results, "peft-mixed", "distinct"))
    ratio("adaptune identical / merged model", ours["identical"], _tok_s(results, "merged", "identical"))
    for w in WORKLOADS:
        ratio(f"adaptune / vLLM-CPU, {w}", ours[w], _tok_s(results, "vllm", w))
    return lines


def _without_outputs(results: dict) -> dict:
    return {tool: {**res, "results": {w: {k: v for k, v in r.items() if k != "outputs"}
                                      for w, r in res.get("results", {}).items()}} for tool, res in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--tools", default=",".join(TOOL_WORKLOADS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--requests", type=int, default=8, help="requests per workload (sent at once)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each workload, in turn; the best is shown")
    parser.add_argument("--sequential-requests", type=int, default=4,
                        help="requests peft-sequential serves (it is slow; its tokens/s does not depend on the count)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per tool (1: on a shared 2-core machine two threads wait on each other)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many s for a quiet machine")
    parser.add_argument("--vllm-python", default=VLLM_PYTHON)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
