"""The model store: MLflow tracking and the registry, the registered model's own code (serving),
where a model comes from, version history, weight pruning and the lock on the champion alias.
Imports flows.core and flows.demo.
"""
