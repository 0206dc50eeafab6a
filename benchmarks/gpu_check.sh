#!/usr/bin/env bash
# One prepared check for a session that is lent a GPU (run from the repository root there, where
# python3 holds PyTorch and Triton; vLLM is not needed): the Triton kernels against their torch twins
# on CUDA, then the decode benchmark against FlashAttention at 32K and 128K tokens. Results go to $OUT
# (the device tool's folder that comes back) or benchmarks/results; exit status 1 if a check fails.
#   bash benchmarks/gpu_check.sh            # about 5 minutes on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DEST/gpu_check_device.txt"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$DEST/gpu_check_device.txt"

status=0
timeout 240 "$PYTHON" benchmarks/gpu_check.py --json "$DEST/gpu_check.json" || status=1
# FLASH_ATTN's layout, bf16, Llama-3-8B attention shape; the defaults' mode and the certified one
timeout 300 "$PYTHON" benchmarks/bench_decode.py --device cuda --contexts 32768,131072 --batches 1,4 \
    --workloads structured --modes topk:512:4,softmax:1e-2:4 --repeat 10 \
    --json "$DEST/bench_decode_cuda.json" --plot "$DEST/bench_decode_cuda.png" || status=1
exit $status
