"""What runs the steps on several machines: the landing zone and release queue, launching
the fine-tune on several processes (DDP/FSDP) and the GPU-pool handoff.
Imports the steps and everything below them; never the drivers or the CLI.
"""
