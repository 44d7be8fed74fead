"""The two thin drivers that chain the steps: the Prefect flow (retrain) and the DVC stages
(stages). They hold the whole Params and resolve paths once.
Import anything but the CLI; nothing imports a driver except the CLI.
"""
