#!/bin/sh
# Entrypoint of the stagewise worker image (infra/docker/worker.Dockerfile): prepare the workspace,
# then run the command (a Prefect worker, `prefect deploy`, or the flow run a Kubernetes job starts).
#
#   1. $STAGEWISE_WORKSPACE (/workspace) without .git: clone the image's project into it
#      ($STAGEWISE_PROJECT_SOURCE, /opt/stagewise). A workspace that is already a clone (a volume
#      from an earlier start) is kept as it is, with the commits its runs made.
#   2. $STAGEWISE_GIT_ORIGIN set: make it the clone's origin, where train-stage fetches a pipeline
#      commit it lacks (compose: the CPU worker's workspace, mounted read-only).
#   3. $STAGEWISE_S3_BUCKET set: the default DVC remote is s3://$STAGEWISE_S3_BUCKET/dvc with
#      endpoint $AWS_ENDPOINT_URL, written with `--local` (.dvc/config.local, which git ignores).
#      The S3 keys are never written: DVC reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the
#      environment.
set -eu
workspace="${STAGEWISE_WORKSPACE:-/workspace}"
source_repo="${STAGEWISE_PROJECT_SOURCE:-/opt/stagewise}"

if [ ! -e "$workspace/.git" ]; then
  if [ -n "$(ls -A "$workspace" 2>/dev/null)" ]; then
    echo "stagewise-entrypoint: $workspace is not empty and not a git clone; empty it (or its volume) and start again" >&2
    exit 1
  fi
  mkdir -p "$workspace"
  git clone -q "$source_repo" "$workspace"
  echo "stagewise-entrypoint: cloned $source_repo into $workspace ($(git -C "$workspace" rev-parse --short HEAD))"
fi
cd "$workspace"

# train-stage runs `git fetch origin` for a pipeline commit it lacks.
if [ -n "${STAGEWISE_GIT_ORIGIN:-}" ]; then
  git remote set-url origin "$STAGEWISE_GIT_ORIGIN" 2>/dev/null || git remote add origin "$STAGEWISE_GIT_ORIGIN"
fi

if [ -n "${STAGEWISE_S3_BUCKET:-}" ]; then
  dvc remote add --local --force --default stack "s3://${STAGEWISE_S3_BUCKET}/dvc"
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
    dvc remote modify --local stack endpointurl "$AWS_ENDPOINT_URL"
  fi
fi

exec "$@"
