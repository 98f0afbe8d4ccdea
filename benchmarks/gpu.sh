#!/usr/bin/env bash
# The kernel, end-to-end and generation tables on one CUDA GPU, in one call of under 8 minutes.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default benchmarks/results/gpu
#
# 1. the Triton kernels, compiled for this GPU, against float64 references (tests/test_triton.py);
# 2. kernels: ours (auto: the faster of torch's fused F.rms_norm + bias and Triton, per shape) vs LayerNorm
#    vs F.rms_norm + bias vs a copy, forward and forward+backward, fp32 and bf16;
# 3. the same at two shapes with each CUDA path pinned (LIGHTNING_CBWC_CUDA_KERNEL=torch / triton);
# 4. end to end: ViT-S/16 (batch 8) and GPT-2 small (seq 512, 1024), LN original vs folded vs no-norm bound;
# 5. generation: GPT-2 small, batch 1 and 8, greedy with the KV cache, per-token and prefill latency.
# Every step has its own timeout (together under 8 minutes) so that one slow step cannot eat the others'.
#
# Runs from the checkout on PYTHONPATH: no `pip install` (a bare GPU machine has no network to fetch build
# dependencies), and nothing here needs wandb.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
$PY -c "import lightning_cbwc" || { echo "cannot import lightning_cbwc from $PWD"; exit 1; }
$PY - <<'PY' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_triton.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
timeout 90 $PY benchmarks/bench_kernels.py --device cuda --reps 40 --json "$OUT/kernels.json" | tee "$OUT/kernels.txt"
for k in torch triton; do
  LIGHTNING_CBWC_CUDA_KERNEL=$k timeout 40 $PY benchmarks/bench_kernels.py --device cuda --reps 40 \
    --shapes 4096x768,16384x1024 --json "$OUT/kernels_$k.json" | tee "$OUT/kernels_$k.txt"
done
timeout 100 $PY benchmarks/bench_e2e.py --device cuda --models vit_s,gpt2_512,gpt2_1024 --dtypes fp32,bf16 \
  --modes eager --rounds 20 --out "$OUT/e2e.json" | tee "$OUT/e2e.txt"
timeout 130 $PY benchmarks/bench_generate.py --device cuda --models gpt2 --batches 1,8 --prompts 32 \
  --new-tokens 64 --dtypes fp32,bf16 --modes eager --rounds 4 --out "$OUT/generate.json" | tee "$OUT/generate.txt"
echo "results in $OUT"
