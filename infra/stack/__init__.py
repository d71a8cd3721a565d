"""The scale-out stack on loopback (S3 store, MLflow server, Prefect server and workers); see
`python -m infra.stack --help`."""
