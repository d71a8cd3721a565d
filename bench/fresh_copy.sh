# Sourced by the end-to-end benchmarks (bench/e2e.sh, bench/ablation.sh): copy the project as a
# clean clone would have it (tracked and new files, no dvc.lock or outputs) into "$work", make it
# its own git repo and move there, with its own Prefect home, MLflow store and DVC site cache.
# Needs $here (the project root), $py (the Python to run) and $work (an empty folder).
cd "$here"
git ls-files -co --exclude-standard | grep -vx dvc.lock | while read -r f; do
  [ -f "$f" ] && mkdir -p "$work/$(dirname "$f")" && cp "$f" "$work/$f"
done
cd "$work"
git init -q && git add -A && git -c user.name=bench -c user.email=bench@localhost commit -qm bench
export PATH="$(dirname "$py"):$PATH" PREFECT_HOME="$work/.prefect-home" MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@localhost GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@localhost
"$py" -m dvc config --local core.site_cache_dir "$work/.dvc-site"
