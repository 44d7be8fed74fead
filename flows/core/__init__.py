"""What every part shares: params.yaml read into typed config, the records that cross steps,
safe readers of files and YAML, the input schemas, release data, leak keys, the git/DVC workspace.
Imports nothing else from flows.
"""
