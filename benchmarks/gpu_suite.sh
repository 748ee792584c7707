#!/usr/bin/env bash
# One short GPU check (< 4 min): training-step speed of the speed-anchor configs (DiT-S/2, U-ViT-M/4, DiMR-M/3R) on CUDA in fp32 and bf16.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root, on a machine with a GPU
#
# Uses only what the machine has (torch, einops, timm, yaml, safetensors); if `zoo` is not
# importable with its entry points, the project is installed editable with no dependencies and
# no index. Batches are larger than the anchors' CPU batches so the GPU has work: DiT-S/2 64,
# U-ViT-M/4 32, DiMR-M/3R 32. bf16 is autocast with fp32 master weights. Utilisation is against
# a 2048³ matmul of the same dtype (fp32 with TF32 off, PyTorch's default).
# Writes the results as JSON lines to $OUT/gpu_suite.jsonl when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# A Python without torch is a broken environment (exit 1, its error shown), not a machine without a GPU.
if ! $PY -c "import torch" >/dev/null; then
  echo "gpu_suite: $PY cannot import torch (above); install the project first (pip install -e .)" >&2
  exit 1
fi
# Without a CUDA GPU there is nothing to measure: say so in one line, and it is not a failure.
if [ "$($PY -c "import torch; print(torch.cuda.is_available())")" != "True" ]; then
  echo "gpu_suite: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to run"
  exit 0
fi
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name())") || { echo "gpu_suite: CUDA is there but its device cannot be read (above)" >&2; exit 1; }
if ! $PY -c "import zoo.backbones, importlib.metadata as m; assert m.entry_points(group='zoo.backbones')" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
    || { echo "could not install the project (pip install --no-deps -e .)"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, '$gpu')"

status=0
for dtype in fp32 bf16; do
  echo "== $dtype"
  timeout 100 $PY benchmarks/train_step.py --device cuda --dtype "$dtype" \
      --batch dit_s_2=64 uvit_m_4=32 dimr_m_3r=32 ${OUT:+--json} ${GPU_SUITE_ARGS:-} \
      > >(tee -a "${OUT:-/tmp}/gpu_suite.log") || status=1
done
if [[ -n "${OUT:-}" ]]; then grep '^{' "$OUT/gpu_suite.log" > "$OUT/gpu_suite.jsonl"; fi
exit $status
