-- The second database of the stack: MLflow uses `mlflow` (POSTGRES_DB), Prefect this one.
CREATE DATABASE prefect;
