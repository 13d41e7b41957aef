#!/usr/bin/env bash
# Stage 2 of proxy-then-promote on the README sweep: retrain its 2 best complete configurations
# at higher fidelity (64 px instead of 48, 8 epochs instead of 5, 3 minutes instead of 1.5).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}   # the venv that make run / make test build
"$PY" -m inat.sweep.proxy experiments/sweep/woof --top-k 2 --out experiments/sweep/woof_promoted -- \
  data.image_size=64 train.epochs=8 train.max_minutes=3 "$@"
"$PY" run.py +mode=sweep_report sweep.dir=experiments/sweep/woof_promoted
