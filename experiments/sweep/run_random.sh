#!/usr/bin/env bash
# The baseline for experiments/sweep/run_sweep.sh: plain random search over the same Part A
# space on the same imagewoof10 subset, same per-trial settings and the same 60-minute compute
# budget, but no TPE and no pruning (every trial is a full-cost trial). savings.py compares the two.
# Usage: experiments/sweep/run_random.sh [extra overrides]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}   # the venv that make run / make test build
PER_CLASS=${PER_CLASS:-120}
SUB=${SUB:-/tmp/inat_woof${PER_CLASS}}
TRIALS=${TRIALS:-400}   # trials this command asks for at most; the budget ends it first
BUDGET=${BUDGET:-60}    # compute-minutes for the whole study (a rerun continues it, and its budget)
OUT=${OUT:-experiments/sweep/woof_random}
# run_sweep.sh builds the subset (symlinks, nothing copied); reuse its code path.
[ -d "$SUB/train" ] || SUB="$SUB" PER_CLASS="$PER_CLASS" bash experiments/sweep/run_sweep.sh --subset-only

"$PY" run.py -m hydra/sweeper=optuna hydra/sweeper/sampler=random hydra.sweeper.sampler.seed=0 \
  hydra.sweep.dir="$OUT" hydra.sweeper.n_trials="$TRIALS" \
  data.root="$SUB" data.image_size=48 data.workers=1 train.threads=2 \
  train.epochs=5 train.max_minutes=1.5 \
  sweep.prune=false sweep.budget_minutes="$BUDGET" \
  wandb.mode=offline "$@"
"$PY" run.py +mode=sweep_report sweep.dir="$OUT"
