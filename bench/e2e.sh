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
cd "$here"
git ls-files -co --exclude-standard | grep -vx dvc.lock | while read -r f; do
  [ -f "$f" ] && mkdir -p "$work/$(dirname "$f")" && cp "$f" "$work/$f"
done
cd "$work"
git init -q && git add -A && git -c user.name=bench -c user.email=bench@localhost commit -qm bench
export PATH="$(dirname "$py"):$PATH" PREFECT_HOME="$work/.prefect-home" MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1
"$py" -m dvc config --local core.site_cache_dir "$work/.dvc-site"

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
