#!/usr/bin/env bash
# `make gpu-check OUT=dir` on a GPU host: the CUDA tests, then packed vs dense timings and IDP
# vs LoRA over the packed base (idp_core/lab/gpu_check.py), one JSON record in OUT. Needs no
# package index: it uses what the host has, plus wheels placed in ./wheels/ beside the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# import name=pip name of everything the check imports (torch must be the host's CUDA build)
NEED="torch=torch transformers=transformers peft=peft accelerate=accelerate \
safetensors=safetensors gguf=gguf tokenizers=tokenizers compressed_tensors=compressed-tensors \
pytest=pytest numpy=numpy"
missing() {
  for pair in $NEED; do
    "$PY" -c "import ${pair%%=*}" 2>/dev/null || printf '%s ' "${pair#*=}"
  done
}
lack=$(missing)
if [ -n "$lack" ] && [ -d wheels ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --find-links wheels $lack || true
  lack=$(missing)
fi
if [ -n "$lack" ]; then
  echo "gpu-check: missing Python packages: ${lack}(put their wheels in ./wheels/ or install them)"
  exit 1
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu-check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA GPU"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project runs from the tree
start=$(date +%s)
timeout 300 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/unit/test_cuda.py \
  tests/unit/test_packed.py 2>&1 | tee "$OUT/cuda-tests.txt"
timeout 300 "$PY" -m idp_core.lab.gpu_check "$OUT"
echo "gpu-check: done in $(( $(date +%s) - start )) s; record: $OUT/gpu-check.json"
