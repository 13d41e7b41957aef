#!/usr/bin/env bash
# The one prepared GPU check (device tool): the engine's tests on CUDA, then the GPU numbers.
#   run: bash experiments/gpu/run.sh   (writes $OUT/gpu.json, $OUT/pytest.txt)
set -uo pipefail
OUT=${OUT:-/tmp/inat_gpu}; mkdir -p "$OUT"
python -m pip install -q -r requirements.txt -r requirements-test.txt >/dev/null 2>&1 || true
python -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu_name.csv" 2>&1
timeout 240 python -m pytest -q -x tests/test_engine.py tests/test_predict.py tests/test_train.py -k "not flowers5" \
  > "$OUT/pytest.txt" 2>&1; echo "pytest exit $?" >> "$OUT/pytest.txt"
timeout 240 python experiments/gpu/gpu_bench.py --out "$OUT/gpu.json"
