#!/usr/bin/env bash
# Part B: EfficientNet-Lite0 (offline ImageNet weights) fine-tuned on flowers5 with each
# freezing strategy under the same small CPU budget, then scored once on the test folder.
# Usage (from the repository root): bash experiments/finetune/run_all.sh [MINUTES] [SIZE]
# Results: outputs/finetune/<strategy>/{summary,test}.json, collected by collect.py.
set -euo pipefail
MINUTES=${1:-5}
SIZE=${2:-160}
PY=${PY:-python}
COMMON=(model=efficientnet_lite0 model.input_size="$SIZE" data.root=../shared/datasets/flowers5
        train.max_minutes="$MINUTES" train.epochs=4 train.batch_size=32 train.lr=2e-3 train.threads=2
        train.precision=auto aug=basic wandb.mode=disabled seed=0)
# precision=auto: bf16 only where the CPU has it natively (AVX512-BF16/AMX); forcing bf16 on an
# AVX2 CPU emulates it at a fifth of fp32's speed.
run() {  # name, overrides...
  local name=$1; shift
  echo "== $name: $*"
  mkdir -p "outputs/finetune/$name"
  /usr/bin/time -o "outputs/finetune/$name/time.txt" -f "cpu_user_s=%U cpu_sys_s=%S wall_s=%e max_rss_kb=%M" \
    "$PY" run.py "${COMMON[@]}" "$@" hydra.run.dir="outputs/finetune/$name" 2>&1 | tail -n 4
}
run linear_probe finetune=linear_probe
run partial_k5 finetune=partial_k=5
run gradual finetune=gradual finetune.every=1
run full finetune=full finetune.lr_decay=0.6
"$PY" experiments/finetune/collect.py outputs/finetune experiments/finetune/results.json | tee experiments/finetune/results.md
