"""Forgetless pipeline: one module per step, chained by the Prefect flow in ``flows.retrain``."""
