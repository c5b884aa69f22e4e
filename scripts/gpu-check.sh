#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: what the GPU path does and how fast it trains.
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# 1. the device, driver and library versions;
# 2. the GPU tests (tests/gpu: fused LoRA equals peft on CUDA kernels, packed rows under CUDA SDPA,
#    LoRA in bf16 and QLoRA on a 4-bit base train and save complete adapters, doctor sees the GPU),
#    OUT_DIR/gpu-tests.log;
# 3. bench/train_mfu.py on a Llama-3.2-1B-shaped model (random weights: nothing is downloaded):
#    tuneline's training loop, LoRA r=16 on every linear, bf16, 8 rows of 1,024 tokens per step;
#    prints tokens/s and MFU against the GPU's bf16 matmul peak measured in the same run (the
#    formula is printed) and doctor's memory estimate beside the measured peak (OUT_DIR/mfu-1b.json);
#    then with compiled decoder layers (train.compile), at 16 rows of 2,048 tokens, and at 2 rows of
#    4,096 tokens (attention's share grows). Each step's output is in OUT_DIR/NAME.log.
# Every step runs even if one before it failed; the script exits non-zero if any failed.
#
# It needs python3 with torch (CUDA), transformers, peft, tokenizers, safetensors, pydantic, PyYAML,
# rich and pytest (PYTHON=... to pick another interpreter); bitsandbytes for the QLoRA test. tuneline
# is read from src/, not installed (its training loop loads only pydantic, PyYAML and rich beside
# those). Wheels in ./.whl are installed first into /tmp/site: on a machine without an index (this
# project's lent H200s lack pydantic and bitsandbytes), fetch them beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic pydantic-core annotated-types typing-inspection typing-extensions bitsandbytes
# (pydantic-core must be the version pydantic pins).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=0
step() {  # step NAME COMMAND...: run it, keep its output in OUT_DIR/NAME.log, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; failed=1; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
step versions "$PY" -c '
import torch, transformers, peft
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.cuda.get_device_name(), f"bf16 {torch.cuda.is_bf16_supported()}")'
step gpu-tests "$PY" -m pytest tests/gpu -q -rA --noconftest -p no:cacheprovider -o addopts=""
MFU="$PY bench/train_mfu.py --shape 1b --answer 64"
step mfu-1b $MFU --steps 20 --warmup 3 --batch 8 --seq 1024 --profile 2 --json "$OUT_DIR/mfu-1b.json"
step mfu-1b-compiled $MFU --steps 20 --warmup 3 --batch 8 --seq 1024 --compile
step mfu-1b-16x2k $MFU --steps 10 --warmup 2 --batch 16 --seq 2048
step mfu-1b-4k $MFU --steps 10 --warmup 2 --batch 2 --seq 4096
exit $failed
