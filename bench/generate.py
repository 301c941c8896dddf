"""Generation speed with a LoRA adapter: adaptune unmerged vs merged, and peft unmerged (and merged).

    python bench/generate.py                 # ~3 min on 2 cores
    python bench/generate.py --summary bench/results/generate-*.json

The embedded SmolLM2-135M-Instruct in fp32; one LoRA adapter (r=8, alpha=16 on q_proj, v_proj,
non-zero B so that it changes the output), made by adaptune, saved in peft's format and loaded by
each tool. Greedy decoding with the KV cache, exactly ``--new-tokens`` new tokens (EOS ignored),
for one prompt (batch 1) and for 8 prompts (batch 8, left-padded). Each tool runs in its own
process, which holds the adapter unmerged and a ``merge_and_unload()`` copy of it and times them
in turn, repeat by repeat (unmerged, merged, merged, unmerged...), so that both meet the same
machine: this VM changes speed by 10-15 % for minutes at a time, which timing one after the other
turned into ratios of 0.82-1.07 for the same code. Reported: new tokens/s (best of ``--repeats``;
all times are in the saved JSON), and whether each variant generated the same tokens as adaptune
unmerged.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPTS = [
    "Write a few lines in the style of Shakespeare about a king who cannot sleep.",
    "Describe the sea at night.",
    "What is the capital of France?",
    "Give me three reasons to learn to cook.",
    "Tell a short story about a lost key.",
    "Explain what a rainbow is to a child.",
    "List four colours.",
    "Why do leaves fall in autumn?",
]


def make_adapter(folder: str) -> None:
    """An adaptune LoRA adapter with small random B (a trained adapter's scale), saved peft-style."""
    import torch

    from adaptune import LoraConfig, get_peft_model
    model, _ = common.load_smollm2()
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **{**common.LORA, "lora_dropout": 0.0}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    peft_model.save_pretrained(folder)


def timed_in_turn(models: dict, tok, prompts, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Greedy generation with each of ``models`` in turn, ``repeats`` times each (the order reversed
    every other round); per model, new tokens/s of each repeat and the tokens generated."""
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=tok.pad_token_id)
    names = list(models)
    runs = {name: {"tok_s": [], "tokens": None} for name in names}
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        for model in models.values():  # warm-up
            model.generate(**enc, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        for round_ in range(repeats):
            for name in names if round_ % 2 == 0 else names[::-1]:
                t = time.perf_counter()
                out = models[name].generate(**enc, **kwargs)
                runs[name]["tok_s"].append(len(prompts) * new_tokens / (time.perf_counter() - t))
                runs[name]["tokens"] = out[:, n:].tolist()
    return runs


def child(tool: str, adapter: str, new_tokens: int, repeats: int, threads: int | None) -> dict:
    import copy

    import torch

    if threads:
        torch.set_num_threads(threads)
    model, tok = common.load_smollm2()
    if tool == "peft":
        from peft import PeftModel
    else:
        from adaptune import PeftModel
    unmerged = PeftModel.from_pretrained(model, adapter).eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    results = {"tool": tool, "threads": torch.get_num_threads(), "runs": {}}
    for batch in (1, 8):
        runs = timed_in_turn({"unmerged": unmerged, "merged": merged}, tok, PROMPTS[:batch], new_tokens, repeats)
        for state, run in runs.items():
            results["runs"][f"{state}/b{batch}"] = run
    return results


def summarize(record: dict) -> str:
    import statistics

    rows = []
    ref = {}  # batch -> adaptune's unmerged tokens, what every other variant is compared with
    for res in record["results"]:
        if res.get("tool") == "adaptune":
            ref = {key.split("/")[1]: run["tokens"] for key, run in res["runs"].items() if key.startswith("unmerged/")}
    for res in record["results"]:
        if "error" in res:
            rows.append([res["args"], "ERROR", res["error"], "", "", ""])
            continue
        for key, run in res["runs"].items():
            state, batch = key.split("/")
            same = run["tokens"] == ref.get(batch)
            best, median = max(run["tok_s"]), statistics.median(run["tok_s"])
            rows.append([res["tool"], state, batch, f"{best:.1f}", f"{median:.1f}", "yes" if same else "no"])
    text = [common.table(rows, ["tool", "weights", "batch", "tok/s best", "tok/s median", "same tokens"])]
    speed = {(r["tool"], k): max(v["tok_s"])
             for r in record["results"] if "error" not in r for k, v in r["runs"].items()}
    for batch in ("b1", "b8"):
        am, au, pu = (speed.get(("adaptune", f"merged/{batch}")), speed.get(("adaptune", f"unmerged/{batch}")),
                      speed.get(("peft", f"unmerged/{batch}")))
        if am and au and pu:
            text.append(f"batch {batch[1:]}: adaptune unmerged / merged x{au / am:.2f}; "
                        f"adaptune unmerged / peft unmerged x{au / pu:.2f}")
    return "\n".join(text)


def summary(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = []
    for batch in ("b1", "b8"):
        ratios_m, ratios_p = [], []
        for run in runs:
            speed = {(r["tool"], k): max(v["tok_s"]) for r in run["results"] if "error" not in r
                     for k, v in r["runs"].items()}
            am, au, pu = (speed.get(("adaptune", f"merged/{batch}")), speed.get(("adaptune", f"unmerged/{batch}")),
                          speed.get(("peft", f"unmerged/{batch}")))
            if am and au and pu:
                ratios_m.append(au / am)
                ratios_p.append(au / pu)
                out.append(f"batch {batch[1:]}: adaptune unmerged {au:.1f}, merged {am:.1f}, "
                           f"peft unmerged {pu:.1f} tok/s")
        if ratios_m:
            m, lo, hi = common.median_spread(ratios_m)
            pm, plo, phi = common.median_spread(ratios_p)
            out.append(f"batch {batch[1:]} over {len(ratios_m)} runs: unmerged/merged x{m:.2f} [{lo:.2f}-{hi:.2f}], "
                       f"adaptune/peft unmerged x{pm:.2f} [{plo:.2f}-{phi:.2f}]")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", choices=("adaptune", "peft"))
    ap.add_argument("--adapter")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--wait-quiet", type=float, default=120,
                    help="before each tool, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--summary", nargs="+")
    args = ap.parse_args()
    if args.summary:
        print(summary(sorted({p for pattern in args.summary for p in glob.glob(pattern)})))
        return
    extra = ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    extra += ["--threads", str(args.threads)] if args.threads else []
    if args.child:
        common.emit(child(args.tool, args.adapter, args.new_tokens, args.repeats, args.threads))
        return
    record = {"load_start": common.load_average(), "new_tokens": args.new_tokens, "results": []}
    print(f"load {record['load_start']}; greedy, {args.new_tokens} new tokens, best of {args.repeats}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        make_adapter(folder)
        for tool in ("adaptune", "peft"):
            res = common.run_child("generate.py", ["--tool", tool, "--adapter", folder, *extra],
                                   quiet_wait=args.wait_quiet)
            record["results"].append(res)
            print(f"  {tool} done (other processes used {100 * res['others_cpu']:.0f}% of the CPUs meanwhile)",
                  flush=True)
    record["load_end"] = common.load_average()
    path = common.save("generate", record)
    print(f"saved {path.relative_to(common.ROOT)}; load at end {record['load_end']}")
    print(summarize(record))


if __name__ == "__main__":
    main()
