#!/usr/bin/env bash
# The device checks of the speed issue in one prepared run, for a session lent a CUDA machine
# (the `device` tool; about 15 minutes of device time in all). Here, once: `make gpu-wheels`
# (captum and the EfficientNet-Lite0 packages as wheels in .whl/, which the device lacks). Then:
#   device run: command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540
# Everything it prints also lands in $OUT (gpu_tests.txt, bench_cuda.txt, layout_cuda.txt).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nbattr-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# 1. the GPU tests (CUDA results equal CPU ones; OOM halving)
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
# 2. nbattr / Captum ratios, peak memory, IG over its floor (steps x one forward+backward)
timeout 300 python3 benchmarks/bench_captum.py --device cuda --repeats 5 2>&1 | tee "$OUT/bench_cuda.txt"
# 3. channels-last on CUDA: add "cuda" to problem.CHANNELS_LAST_DEVICES where the ratio is < 1
timeout 90 python3 benchmarks/bench_layout.py --device cuda --repeats 5 2>&1 | tee "$OUT/layout_cuda.txt"
