# MLflow tracking server for infra/docker-compose.yml: runs and registry in Postgres, artifacts
# proxied to S3 (--serve-artifacts), so clients need no S3 access of their own for MLflow.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t stagewise-mlflow infra/docker
FROM python:3.11-slim

# Same range as pyproject.toml: mlflow 3.18.0's sub-packages were never published.
RUN pip install --no-cache-dir "mlflow>=3,<3.18" psycopg2-binary boto3

ENV MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
