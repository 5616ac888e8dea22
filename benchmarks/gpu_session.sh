#!/usr/bin/env bash
# Every GPU check of normlab in one run, for a session lent a GPU machine (about 8 minutes on one card):
#   bash benchmarks/gpu_session.sh            # writes its logs to $OUT (or ./gpu-session) and prints them
# 1. the card and the environment; 2. the fast tier's CUDA tests (tests/test_cuda.py, skipped on CPUs);
# 3. benchmarks/gpu.py (VGG-16 / ResNet-50 bf16 + channels_last against a bf16 GEMM; BN/GN/LN/NF per step);
# 4. the cost study's training-step part on the GPU (normlab study cost --device cuda);
# 5. the default `normlab compare --device cuda`, its wall time (stopped at 240 s, said so if it was).
# Record the card and the figures in the README; never copy a figure from another card.
set -u
out="${OUT:-gpu-session}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
step() { echo; echo "== $1"; }
{
  step "card"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  step "install (no downloads: --no-deps)"
  python3 -m pip install --no-deps -q -e . 2>&1 | tail -2
  python3 -c "import normlab, rich, typer, mnist1d; print('normlab imports: ok')" 2>&1
} | tee "$out/env.txt"
step "CUDA tests" | tee "$out/tests.txt"
timeout 180 python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tail -15 | tee -a "$out/tests.txt"
step "benchmarks/gpu.py" | tee "$out/gpu.txt"
timeout 150 python3 benchmarks/gpu.py --json "$out/gpu.json" 2>&1 | tee -a "$out/gpu.txt"
step "cost study, training step on the GPU" | tee "$out/cost.txt"
timeout 120 python3 -m normlab study cost --device cuda --scale quick --store "$out/cost.sqlite" \
  --out "$out/cost" 2>&1 | tail -25 | tee -a "$out/cost.txt"
step "normlab compare --device cuda (default grid)" | tee "$out/compare.txt"
start=$(date +%s)
timeout 240 python3 -m normlab compare --device cuda --store "$out/compare.sqlite" --out "$out/compare" \
  --no-report 2>&1 | tail -25 | tee -a "$out/compare.txt"
rc=${PIPESTATUS[0]}
echo "compare --device cuda: exit $rc, wall $(( $(date +%s) - start )) s (124 = stopped at 240 s)" | tee -a "$out/compare.txt"
