"""The ``forgetless`` command (main) and the strategy guide it prints.
It parses arguments, loads params.yaml and calls a driver or a registry function.
Imports anything; nothing imports it.
"""
