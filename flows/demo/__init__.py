"""The embedded demo: builds the default model's releases and probe sources from data that
ships with the installed packages, offline.
Imports flows.core only.
"""
