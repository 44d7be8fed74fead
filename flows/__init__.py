"""Forgetless pipeline: one module per step, chained by the Prefect flow in ``flows.drivers.retrain``."""

from flows.core.workspace import quiet_env

quiet_env()  # before Prefect, MLflow or DVC start anything
