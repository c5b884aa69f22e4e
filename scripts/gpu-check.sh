#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: what the GPU path does and how fast it trains.
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# 1. the device, driver and library versions;
# 2. bench/train_mfu.py on a Llama-3.2-1B-shaped model (random weights: nothing is downloaded):
#    tuneline's training loop, LoRA r=16 on every linear, bf16, 8 rows of 1,024 tokens per step,
#    20 timed steps; prints tokens/s and MFU against the GPU's bf16 matmul peak measured in the
#    same run (the formula is printed), and writes OUT_DIR/mfu-1b.json;
# 3. the same at 4,096 tokens per row (attention's share grows), OUT_DIR/mfu-1b-4k.json.
#
# It needs python3 with torch (CUDA), transformers, peft, tokenizers, pydantic, PyYAML and rich
# (PYTHON=... to pick another interpreter); tuneline is read from src/, not installed (importing
# its training loop loads only pydantic, PyYAML and rich beside those). Wheels in ./.whl are
# installed first into /tmp/site: on a machine without an index (this project's lent H200s lack
# pydantic), fetch them beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection
# (pydantic-core must be the version pydantic pins).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" - <<'PY'
import torch, transformers, peft
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.cuda.get_device_name(), f"bf16 {torch.cuda.is_bf16_supported()}")
PY
"$PY" bench/train_mfu.py --shape 1b --steps 20 --warmup 3 --batch 8 --seq 1024 --answer 64 --json "$OUT_DIR/mfu-1b.json"
"$PY" bench/train_mfu.py --shape 1b --steps 10 --warmup 2 --batch 2 --seq 4096 --answer 64 --json "$OUT_DIR/mfu-1b-4k.json"
