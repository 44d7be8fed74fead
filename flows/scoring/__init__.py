"""Scoring probe and eval items, the score cache, the gate's statistics (exact confidence
bounds), stratified splits and the accuracy matrix.
Imports flows.core, flows.demo and flows.registry.
"""
