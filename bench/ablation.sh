#!/usr/bin/env bash
# Times the default curriculum ablation (`python -m flows.ablation`: every variant of params.yaml's
# ablation block x every seed) in a fresh copy of the project (its own git repo, Prefect home and
# MLflow store, nothing reused), and reports what DVC's caching saved: the shared stages' time
# counted once instead of once per run.
#   bash bench/ablation.sh [--variants a,b] [--seeds 1,2]     # arguments go to flows.ablation
#   KEEP=/tmp/ablation bash bench/ablation.sh                 # work there and keep it (dvc exp show, mlflow ui)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
if [ -n "${KEEP:-}" ]; then
  work=$KEEP; mkdir -p "$work"; [ -z "$(ls -A "$work")" ] || { echo "KEEP=$work is not empty"; exit 2; }
else
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
fi
. "$here/bench/fresh_copy.sh"

t0=$(date +%s.%N)
"$py" -m flows.ablation "$@" > "$work/ablation.log" 2>&1 || { tail -40 "$work/ablation.log"; exit 1; }
t1=$(date +%s.%N)
echo "cores: $(nproc)  torch threads: $("$py" -c 'import torch; print(torch.get_num_threads())')"
cat reports/ablation/verdict.md
"$py" - "$t0" "$t1" <<'PY'
import json, sys
runs = json.load(open("reports/ablation/runs.json"))
wall = float(sys.argv[2]) - float(sys.argv[1])
ran = sum(sum(r["stages_ran"].values()) for r in runs["runs"]) + sum(runs["shared_stages"].values())
print(f"ablation wall time: {wall:.0f} s for {len(runs['runs'])} runs (stages ran for {ran:.0f} s of it; "
      f"the rest is DVC, Prefect and MLflow)")
print(f"shared stages, once: {', '.join(f'{k} {v:.0f} s' for k, v in runs['shared_stages'].items())}")
for r in runs["runs"]:
    print(f"  {r['experiment']:40s} {r['seconds']:6.0f} s  tokens {r['tokens_trained']:>9,}  ran {', '.join(r['stages_ran']) or 'nothing'}")
print(f"saved by DVC's caching: {runs['saved_by_caching_seconds']:.0f} s (each reused stage at the time it took where it ran)")
PY
