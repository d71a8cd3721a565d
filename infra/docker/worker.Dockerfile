# The stagewise worker image: the project's dependencies, git and dvc, and the project itself as a
# git repository at /opt/stagewise. Its entrypoint clones that repository into the workspace
# ($STAGEWISE_WORKSPACE, /workspace) on first start and points the workspace's DVC remote at the
# shared bucket. It runs a Prefect process worker in infra/docker-compose.yml and is the job image
# of the Kubernetes GPU pool (infra/k8s). Build from the project root:
#
#   docker build -f infra/docker/worker.Dockerfile -t stagewise-worker:cpu .
#   docker build -f infra/docker/worker.Dockerfile -t stagewise-worker:gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_SPEC=torch==2.13.0 --build-arg EXTRAS=gpu .
#
# What is in the build context goes in, committed or not; uncommitted changes become one commit on
# top of HEAD with fixed author and dates, so the CPU and GPU images built from one context hold the
# same commit (a GPU job can check out the pipeline's commit without fetching it).
# infra/docker/worker.Dockerfile.dockerignore keeps the venv, credentials, stores and outputs out.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The CPU wheel by default: PyPI's Linux torch is the multi-GB CUDA build.
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# pyproject extras, e.g. "gpu" (Liger kernels, NVML metrics)
ARG EXTRAS=""

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 \
    MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

# The CUDA base images carry no Python; python:3.11-slim carries no git.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates \
 && if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get install -y --no-install-recommends python3 python3-venv; fi \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# torch first, so that the project's loose floor (torch>=2.4) does not pick another build.
RUN pip install --upgrade pip && pip install ${TORCH_SPEC}

# Dependencies only, before the sources so that a code change reuses this layer; empty packages
# stand in for ours. The project itself is not installed: Prefect loads flows from the workspace
# and DVC's `python -m tasks.*` runs there (the working directory comes first on sys.path), and an
# installed copy could shadow the commit a run checked out.
WORKDIR /opt/stagewise
COPY pyproject.toml README.md ./
RUN mkdir tasks flows && touch tasks/__init__.py flows/__init__.py \
 && pip install ".${EXTRAS:+[$EXTRAS]}" && pip uninstall -y stagewise && rm -rf tasks flows build *.egg-info

# Runs commit results (dvc.lock, metrics) and `dvc exp` needs an identity.
RUN git config --system user.name "stagewise worker" \
 && git config --system user.email "worker@stagewise.invalid" \
 && git config --system --add safe.directory '*'

COPY . .
# .git/config and hooks are not in the context (they may hold remote URLs with tokens): `git init`
# rewrites them for an existing repository, or starts one for a context without .git. A .git
# *file* (a worktree) points outside the context and is dropped.
RUN [ ! -f .git ] || rm .git \
 && if [ -d .git ]; then git init -q; else git init -q -b main; fi \
 && git add -A \
 && if ! git rev-parse -q --verify HEAD >/dev/null || ! git diff --cached --quiet; then \
      GIT_AUTHOR_DATE="2000-01-01T00:00:00+0000" GIT_COMMITTER_DATE="2000-01-01T00:00:00+0000" \
      git commit -q -m "stagewise worker image: the build context as built"; fi \
 && (git symbolic-ref -q HEAD >/dev/null || git checkout -q -B main)

COPY infra/docker/worker-entrypoint.sh /usr/local/bin/stagewise-entrypoint
# The workspace starts empty (a volume in compose, the container's own layer in a Kubernetes job).
RUN mkdir -p /workspace
ENV STAGEWISE_PROJECT_SOURCE=/opt/stagewise STAGEWISE_WORKSPACE=/workspace
WORKDIR /workspace
ENTRYPOINT ["/bin/sh", "/usr/local/bin/stagewise-entrypoint"]
CMD ["prefect", "worker", "start", "--pool", "cpu-pool", "--type", "process"]
