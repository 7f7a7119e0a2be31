#!/usr/bin/env bash
# GPU check, one command on a CUDA machine (from anywhere): bash bench/gpu_check.sh [gpu_train.py flags]
#
#  1. the tests marked `gpu` (tests/test_gpu.py): a tiny model trained on the GPU in bf16 gives the rewards of
#     the same run in fp32 on the CPU, and an export loaded and scored on the GPU gives the CPU's rewards;
#  2. bench/gpu_train.py: a 0.5B Qwen2-architecture reward model (random weights, nothing downloaded) trained
#     through rewardforge's setup()/train() with FSDP in bf16 over every visible GPU (torchrun), printing
#     pairs/s, MFU against the GPU's bf16 peak and peak memory.
#
# Meant to take a few minutes (not yet run on a GPU; the training part is capped at 8). Flags after the command go to
# gpu_train.py, e.g. --steps 100 --max-length 1024 --batch-size 16. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's rewardforge
export TOKENIZERS_PARALLELISM=false
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu_check.sh: no CUDA GPU is visible to torch (torch.cuda.is_available() is false); run it on a machine with NVIDIA GPUs and a CUDA build of torch" >&2
    exit 2
fi
# the GPUs this process may use (CUDA_VISIBLE_DEVICES respected); nvidia-smi -L lists them all
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
command -v nvidia-smi >/dev/null && nvidia-smi -L
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible GPU(s)")'

echo "== 1/2: tests marked gpu"
"$PYTHON" -m pytest -q -m gpu tests/test_gpu.py

echo "== 2/2: 0.5B decoder, FSDP over $GPUS GPU(s), bf16"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rf-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" bench/gpu_train.py --prepare --workdir "$WORK" "$@"
timeout 480 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" \
    bench/gpu_train.py --workdir "$WORK" --json "$WORK/result.json" "$@"
echo "gpu check passed in ${SECONDS}s"
