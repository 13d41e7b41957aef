#!/usr/bin/env bash
# The README sweep: Part A search space (TPE, seed 0) on a class-balanced imagewoof10 subset,
# median pruning on, a 60-minute compute budget, one process with 2 threads (2-core CPU).
# Writes experiments/sweep/woof/ (trial folders, optuna.db) then the sweep report.
# Usage: experiments/sweep/run_sweep.sh [extra overrides]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}   # the venv that make run / make test build
SRC=${SRC:-../shared/datasets/imagewoof10}
PER_CLASS=${PER_CLASS:-120}   # train images per class (first N by name): CPU time, not data, is scarce
SUB=${SUB:-/tmp/inat_woof${PER_CLASS}}
TRIALS=${TRIALS:-400}   # trials this command asks for at most; the budget ends it first
BUDGET=${BUDGET:-60}    # compute-minutes for the whole study (a rerun continues it, and its budget)
OUT=${OUT:-experiments/sweep/woof}

# The subset links the shared photos (nothing copied, nothing committed); val/ (the test
# folder) is linked whole but a sweep never reads it.
if [ ! -d "$SUB/train" ]; then
  "$PY" - "$SRC" "$SUB" "$PER_CLASS" <<'PYEOF'
import os, sys
from pathlib import Path
src, sub, n = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3])
for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
    (sub / "train" / cls.name).mkdir(parents=True, exist_ok=True)
    for f in sorted(cls.iterdir())[:n]:
        os.symlink(f, sub / "train" / cls.name / f.name)
os.symlink(src / "val", sub / "val")
PYEOF
fi
[ "${1:-}" = "--subset-only" ] && exit 0

"$PY" run.py -m hydra/sweeper=optuna hydra.sweep.dir="$OUT" hydra.sweeper.n_trials="$TRIALS" hydra.sweeper.sampler.n_startup_trials=8 \
  data.root="$SUB" data.image_size=48 data.workers=1 train.threads=2 \
  train.epochs=5 train.max_minutes=1.5 \
  sweep.prune=true sweep.prune_warmup_epochs=1 sweep.prune_min_trials=3 sweep.budget_minutes="$BUDGET" \
  wandb.mode=offline "$@"
"$PY" run.py +mode=sweep_report sweep.dir="$OUT"
