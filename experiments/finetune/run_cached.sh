#!/usr/bin/env bash
# Part B, second round: partial fine-tuning of EfficientNet-Lite0 at its native 224 px on the
# cached outputs of the frozen groups (finetune.cache_views), so several epochs fit a 2-core CPU.
# Usage (from the repository root): bash experiments/finetune/run_cached.sh [run names...]
# Results: outputs/finetune_cached/<run>/{summary.json,test/,time.txt}, then collect.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/finetune_cached}
# Random-resized crop (area 0.5-1) + flip + colour jitter, drawn per view; test-time flip.
COMMON=(data.root=../shared/datasets/flowers5 train.threads=2 train.batch_size=32 train.max_minutes=0
        aug=basic aug.shift=0 aug.crop_scale=0.5 aug.color=0.2 wandb.mode=disabled seed=0)
run() {  # name, overrides...
  local name=$1; shift
  echo "== $name: $*"
  mkdir -p "$OUT/$name"
  /usr/bin/time -o "$OUT/$name/time.txt" -f "cpu_user_s=%U cpu_sys_s=%S wall_s=%e max_rss_kb=%M" \
    "$PY" run.py "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name/log.txt" 2>&1
  grep -aoE "(best val|test accuracy|frozen outputs cached).*" "$OUT/$name/log.txt" || tail -n 3 "$OUT/$name/log.txt"
}
ALL=("$@")
sel() { [ ${#ALL[@]} -eq 0 ] && return 0; for a in "${ALL[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }
# k=7: stem..stage5 frozen; stage6 + head conv + head train (1.0 M parameters). precision=auto: bf16
# measured fastest for this cut on an AVX512-BF16 CPU, and auto picks it only where it is native.
sel lite0_k7_v8 && run lite0_k7_v8 "${COMMON[@]}" model=efficientnet_lite0 finetune=partial finetune.k=7 finetune.cache_views=8 \
  train.epochs=15 train.lr=1e-3 train.precision=auto
# k=5: stem..stage3 frozen; stages 4-6 + head train (3.1 M); fp32 on any CPU (bf16 backward through the
# depthwise stages was slower even on the AVX512-BF16 CPU), the auto policy (bf16 / fp16 AMP) on a GPU.
K5_PRECISION=$("$PY" -c "import torch; print('auto' if torch.cuda.is_available() else '32')")
sel lite0_k5_v8 && run lite0_k5_v8 "${COMMON[@]}" model=efficientnet_lite0 finetune=partial finetune.k=5 finetune.cache_views=8 \
  train.epochs=10 train.lr=1e-3 train.precision="$K5_PRECISION"
# EfficientNet-Lite2 (260 px, 6.1 M parameters with a 1000-class head): the same cut as lite0_k7_v8.
sel lite2_k7_v8 && run lite2_k7_v8 "${COMMON[@]}" model=efficientnet_lite2 finetune=partial finetune.k=7 finetune.cache_views=8 \
  train.epochs=15 train.lr=1e-3 train.precision=auto
# The scratch CNN with the CPU defaults (96 px, 5 x 32 filters) given the wall time of the best
# fine-tuned run above (20 minutes instead of the default 10), for a same-budget comparison.
sel scratch_20min && run scratch_20min data.root=../shared/datasets/flowers5 train.threads=2 wandb.mode=disabled seed=0 \
  train.max_minutes=20 train.epochs=100
true
