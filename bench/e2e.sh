#!/usr/bin/env bash
# Times the default pipeline end to end and a no-op `dvc repro`, in a fresh copy of the project
# (its own git repo, Prefect home and MLflow store), so nothing here is reused.
#   bash bench/e2e.sh            # or: make bench
# Targets on 2 CPU cores: default pipeline <= 10 min; no-op `dvc repro` <= 3 s.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
. "$here/bench/fresh_copy.sh"

now() { date +%s.%N; }
t0=$(now); "$py" -m flows.pipeline > "$work/pipeline.log" 2>&1; t1=$(now)
pipeline_s=$("$py" -c "print($t1 - $t0)")
noop=()
for _ in 1 2 3; do
  t0=$(now); "$py" -m dvc repro > "$work/noop.log" 2>&1; t1=$(now)
  grep -q "Running stage" "$work/noop.log" && { echo "dvc repro was not a no-op"; cat "$work/noop.log"; exit 1; }
  noop+=("$("$py" -c "print(round($t1 - $t0, 2))")")
done
echo "cores: $(nproc)  torch threads: $("$py" -c 'import torch; print(torch.get_num_threads())')"
grep "pipeline:" "$work/pipeline.log" | tail -1
printf 'default pipeline (python -m flows.pipeline): %.1f s\n' "$pipeline_s"
printf 'no-op dvc repro: %s s (3 runs)\n' "${noop[*]}"
cat "$work/metrics/evaluate.json"
