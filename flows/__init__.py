"""Forgetless pipeline: one sub-package per role, the steps chained by the Prefect flow in
``flows.drivers.retrain``."""

from flows.core.workspace import quiet_env

# The sub-packages, bottom to top: a module imports only its own and those before it
# (tests/test_architecture.py checks it; the docs' architecture page is drawn from it).
LAYERS = ("core", "demo", "registry", "scoring", "steps", "production", "drivers", "cli")

quiet_env()  # before Prefect, MLflow or DVC start anything
