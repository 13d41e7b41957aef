#!/usr/bin/env bash
# The one prepared GPU check, for a bare machine with no package index (the device tool's H200):
# the benchmark first (numbers are the scarce output), then the CUDA-relevant tests. Inside 8 minutes:
# the stages' timeouts add up to 480 s (pip 30, versions 10+15, bench 225+5, pytest 185+10).
#
#   here, once, where an index is reachable:   bash experiments/gpu/wheels.sh
#   on the GPU machine (carry [".whl"]):        bash experiments/gpu/run.sh
#   here, the same at tiny sizes on the CPU:    bash experiments/gpu/run.sh --smoke
#
# Writes into $OUT (default outputs/gpu_check): gpu.json (rewritten after every row), bench.log,
# junit.xml, pytest.txt, env.txt. Needs python3 with torch, torchvision, timm, numpy, pillow, pyyaml,
# tqdm, pytest and pytest-timeout; hydra-core, omegaconf and antlr4 come from the wheels in .whl/,
# installed into a temporary folder. requirements.txt is never installed (it pins another torch).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
SMOKE=()
case "${1:-}" in
  --smoke) SMOKE=(--smoke) ;;
  "") ;;
  *) echo "usage: bash experiments/gpu/run.sh [--smoke]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/outputs/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
TMP=$(mktemp -d "${TMPDIR:-/tmp}/inat_gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$TMP"' EXIT
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 WANDB_MODE=disabled INAT_CACHE="$TMP/cache"
T0=$SECONDS

# 1. The wheels, offline, into a folder of their own (--no-deps: the machine has their needs).
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]} == 0)); then
  echo "error: no wheels in .whl/: run bash experiments/gpu/wheels.sh where a package index is reachable, and" \
       "name .whl in the device call's carry." >&2
  exit 2
fi
if ! timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$TMP/site" "${wheels[@]}"; then
  echo "error: the offline install of .whl/*.whl failed (see above)." >&2
  exit 2
fi
export PYTHONPATH="$TMP/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. What the numbers ran on.
{
  echo "wheels: ${wheels[*]}"
  timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  timeout 15 "$PY" -c "import sys, torch, hydra, omegaconf; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'available', torch.cuda.is_available(),
'hydra', hydra.__version__, 'omegaconf', omegaconf.__version__, 'cpu', torch.backends.cpu.get_cpu_capability())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 3. The benchmark: gpu.json after every row; rows past its own budget (210 s) are marked, not run.
timeout -k 5 225 "$PY" experiments/gpu/gpu_bench.py "${SMOKE[@]}" --out "$OUT/gpu.json" --log "$OUT/bench.log" \
  --work "$TMP/bench"
bench_rc=$?
echo "bench exit $bench_rc after $((SECONDS - T0)) s"
rm -rf "$TMP/bench"  # the decode caches (GBs at 224 px)

# 4. The CUDA-relevant tests: per-test timeout, no -x, junit. Deselected: the ../shared data test (shared/
# does not travel), the gloo DDP tests (CUDA_VISIBLE_DEVICES="" by construction: CPU-only), the nine
# bad-input subprocesses (input errors, no CUDA in them). --smoke collects the same files and runs the
# fast subset: the rest of them run in the ordinary suite.
TESTS=(tests/test_engine.py tests/test_train.py tests/test_predict.py tests/test_cached_partial.py tests/test_freeze.py)
DESELECT=(
  --deselect tests/test_train.py::test_real_training_on_flowers5_beats_chance
  --deselect tests/test_train.py::test_ddp_two_cpu_processes_with_gloo
  --deselect tests/test_train.py::test_bad_input_one_sentence_nonzero_nothing_half_written
  --deselect tests/test_engine.py::test_ddp_budget_stop_is_rank_zeros_decision
  --deselect tests/test_engine.py::test_ddp_gradual_unfreezing_keeps_replicas_identical
)
K=()
if ((${#SMOKE[@]})); then
  slow="resume or leaked_images or run_folder_then_tests or cached_partial_run or bn_train_all"
  K=(-k "not ($slow)")
fi
# SIGINT first: pytest then still writes junit.xml with what ran.
timeout -s INT -k 10 185 "$PY" -m pytest -p no:cacheprovider -rA --timeout 120 --junitxml "$OUT/junit.xml" \
  -o junit_family=xunit2 "${TESTS[@]}" "${DESELECT[@]}" "${K[@]}" > "$OUT/pytest.txt" 2>&1
rc=$?
grep -E "^(FAILED|ERROR) " "$OUT/pytest.txt" | head -30
tail -n 1 "$OUT/pytest.txt"
echo "pytest exit $rc after $((SECONDS - T0)) s"
echo "== gpu.json"
"$PY" -c "
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps(d.get('device')))
for name, row in d.get('rows', {}).items():
    print(name, json.dumps({k: v for k, v in row.items() if k not in ('epochs', 'overrides', 'log_tail')})[:900])
" "$OUT/gpu.json" 2>&1 || true
# 0 only when every row has its number and no test failed or errored
exit $(( bench_rc != 0 || rc != 0 ))
