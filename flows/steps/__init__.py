"""The pipeline's steps in the design card's order: version, validate, probes, finetune,
evaluate, gate, register, promote (plus the tournament over candidates and the report).
Imports core, demo, registry and scoring; never production, the drivers or the CLI.
"""
