#!/usr/bin/env bash
# The bf16 training comparison (bench/train.py --bf16: adaptune vs peft + transformers.Trainer) on a
# CUDA device, in under 8 minutes.
#
#   bash bench/gpu.sh --prepare      # here, once: SmolLM2-135M's config + tokenizer into .gpu-model/
#   bash bench/gpu.sh                # on the GPU machine (it has torch, transformers, peft, accelerate)
#
# The GPU machine cannot download and the embedded GGUF is larger than what travels to it, so it
# builds SmolLM2-135M from its config with seeded random weights: the same shapes, so the same work
# a step, and the speed and memory ratios hold; the validation losses are those of random weights.
# adaptune runs from src/ (PYTHONPATH), nothing is installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
model_dir=.gpu-model
if [ "${1:-}" = "--prepare" ]; then
  PYTHONPATH=src python3 - "$model_dir" <<'PY'
import sys

from adaptune.hub import load_config, load_tokenizer

config, tokenizer = load_config(None), load_tokenizer(None)
config.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
print(f"wrote {sys.argv[1]}: carry it to the GPU machine with the working tree")
PY
  exit 0
fi
[ -f "$model_dir/config.json" ] || { echo "run 'bash bench/gpu.sh --prepare' first" >&2; exit 2; }
export PYTHONPATH="src:${PYTHONPATH:-}" ADAPTUNE_BENCH_MODEL="$model_dir" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python3 bench/train.py --bf16 --device cuda --wait-quiet 0 --retries 0 "$@"
