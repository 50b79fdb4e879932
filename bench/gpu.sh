#!/usr/bin/env bash
# bench/vs_vllm.py on a GPU machine: elasticmoe (device auto -> cuda, bf16, decode batches
# padded to CUDA-graph-friendly buckets, experts through torch._grouped_mm on sm90+) against
# vLLM's CUDA build in its own virtualenv (.vllm-cuda-venv/, installed on first use).
#
#   bash bench/gpu.sh > vs_vllm_gpu.json            # offline + served, local + distributed
#   PARTS=offline MODES=local bash bench/gpu.sh     # a quick look
#
# Needs: an NVIDIA GPU with a driver, `make setup` done with a CUDA build of torch
# (TORCH_SPEC=torch make setup on a machine whose index serves one). Not run by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PARTS=${PARTS:-offline,served}
MODES=${MODES:-local,distributed}
NUM_PROMPTS=${NUM_PROMPTS:-256}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: torch in $PY sees no CUDA device; install a CUDA build of torch first" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
exec "$PY" bench/vs_vllm.py \
  --vllm-build cuda \
  --parts "$PARTS" --modes "$MODES" \
  --num-prompts "$NUM_PROMPTS" --max-num-seqs 256 --max-num-batched-tokens 8192 \
  --engine-args '{"decode_buckets": [1, 2, 4, 8, 16, 32, 64, 128, 256]}' \
  "$@"
