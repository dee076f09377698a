#!/usr/bin/env bash
# One device call: GPU tests, kernel benchmarks, quickstart. Results land in $OUT (and are copied
# into benchmarks/results/ by hand afterwards). Usage: bash benchmarks/gpu_session.sh [what...]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "(editable install failed; PYTHONPATH only)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
for what in "$@"; do
  case $what in
    tests) timeout 300 python3 -m pytest -q -m gpu tests/kernels -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu-tests.txt" ;;
    quickstart) timeout 180 python3 examples/quickstart.py 2>&1 | tail -20 | tee "$OUT/quickstart-gpu.txt" ;;
    *) timeout 400 python3 benchmarks/run.py "$what" --out "$OUT" 2>&1 | tail -40 ;;
  esac
done
