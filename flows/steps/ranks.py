"""A fine-tune rank among several (DDP, or FSDP with ``train.fsdp``): what it checks before
training, which GPU it takes, and how the candidate is written once at the end.

``flows.production.launch`` starts the ranks; each runs ``flows.steps.finetune.finetune``, which
calls these. The strategies combine what they measure across ranks (``cf_strategies.distributed``);
``saves_candidate`` checks that their state agrees on every rank, then rank 0 alone writes the
candidate while the others wait. Under FSDP each rank holds a shard of every adapter matrix:
``gathered_adapter`` puts them together and rank 0 puts them on the champion, read again on the
CPU, to write the candidate (``champion_with_adapter``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch.distributed.tensor import DTensor

import cf_strategies
from cf_strategies import distributed
from flows.core.config import TrainConfig
from flows.registry.serving import load

LAUNCH_DIR = "launch"  # in the run folder: inputs, result, each rank's log and error
FINGERPRINTS = "state_fingerprints.json"  # the strategies' state on each rank
SHARDS = "shards.json"  # under FSDP: the parameters each rank held
FSDP_ON_CPU = "FORGETLESS_FSDP_ON_CPU"  # "1": FSDP on CPU ranks over gloo (flows.production.launch)


def process_count(train: TrainConfig) -> int:
    """The processes ``train.num_processes`` asks for: "auto" is one per visible GPU (1 on a
    machine without one)."""
    if train.num_processes == "auto":
        return max(1, torch.cuda.device_count())
    return int(train.num_processes)


def launched_world() -> int:
    """The number of ranks of the launch this process is part of (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_ranks(train: TrainConfig, world: int) -> None:
    """Refuse, before anything is trained, what several processes cannot run correctly: a
    strategy not made rank-safe (its state would differ between ranks, and rank 0's alone would
    be saved), FSDP without GPUs or with a strategy that reads the weights itself, more ranks
    than GPUs, or a half-set launch environment."""
    if world <= 1:
        return
    if "RANK" not in os.environ and launched_world() > 1:
        raise RuntimeError(
            f"WORLD_SIZE is {launched_world()} but RANK is not set: not a complete distributed "
            "launch. Set train.num_processes in params.yaml instead of launching the step "
            "yourself, or launch it with accelerate launch / torchrun"
        )
    names = cf_strategies.split_spec(train.strategy)
    unsafe = [n for n in names if not cf_strategies.STRATEGIES[n].rank_safe]
    if unsafe:
        safe = sorted(n for n, cls in cf_strategies.STRATEGIES.items() if cls.rank_safe)
        raise RuntimeError(
            f"strategy {'+'.join(unsafe)} does not run on several processes yet ({world} "
            f"asked): its state would differ between ranks. Set train.num_processes: 1, or use "
            f"strategies that do: {', '.join(safe)}"
        )
    gpus = torch.cuda.device_count()
    if gpus and world > gpus:
        raise RuntimeError(
            f"train.num_processes is {world} but {gpus} GPU(s) are visible: one process per GPU"
        )
    if train.fsdp:
        if not gpus and os.environ.get(FSDP_ON_CPU) != "1":
            raise RuntimeError(
                "train.fsdp shards the model over GPUs and none is visible (accelerate runs FSDP "
                f"on accelerators only); set train.fsdp: false to train with DDP on the CPU, or "
                f"{FSDP_ON_CPU}=1 to try the sharded path on CPU ranks (slow)"
            )
        unsharded = [n for n in names if not cf_strategies.STRATEGIES[n].shard_safe]
        if unsharded:
            raise RuntimeError(
                f"strategy {'+'.join(unsharded)} reads or keeps the weights itself, which FSDP "
                "shards over the ranks; set train.fsdp: false (DDP: every rank holds the whole "
                "model) or use strategies that reach the weights only through the model: "
                + ", ".join(sorted(n for n, c in cf_strategies.STRATEGIES.items() if c.shard_safe))
            )


def enter_rank() -> None:
    """Inside a rank on GPUs: make this rank's GPU the current one, so that every ``"cuda"``
    placement (loading the champion included) lands on it rather than on GPU 0."""
    if launched_world() > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def sharded() -> bool:
    """True inside a rank of an FSDP launch: the model is loaded on the CPU and accelerate
    shards it onto the GPUs (module doc)."""
    return launched_world() > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def saves_candidate(trainer, strategies: list, run_dir: Path, champion_dir: Path) -> bool:
    """After training: True on the rank that writes the candidate (rank 0, or the only one).

    Several ranks: the strategies' state must be the same on every rank (fingerprints,
    written to ``launch/state_fingerprints.json``). Under FSDP every rank holds a shard of each
    adapter matrix: ``gathered_adapter`` puts them together (a collective, every rank takes
    part) and rank 0's ``trainer.model`` becomes the champion, read again on the CPU, with the
    gathered adapter, for the candidate to be written from."""
    if not distributed.is_distributed():
        return True
    prints = distributed.state_fingerprints(strategies)
    folder = Path(run_dir) / LAUNCH_DIR
    if trainer.is_fsdp_enabled:
        shares = distributed.all_gather_objects(parameter_share(trainer.model))
        adapter = gathered_adapter(trainer.model)
        if distributed.rank() == 0:
            trainer.model = champion_with_adapter(trainer.model, adapter, champion_dir)
            (folder / SHARDS).write_text(json.dumps(shares, indent=1))
    if distributed.rank() != 0:
        return False
    (folder / FINGERPRINTS).write_text(json.dumps(prints, indent=1))
    return True


def parameter_share(model: torch.nn.Module) -> dict[str, int]:
    """How many of the model's parameters this rank holds (its shards) of how many in all."""
    params = list(model.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return {"held": held, "total": sum(p.numel() for p in params)}


def gathered_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (the LoRA adapter) whole, on the CPU, from every rank's shards
    (``DTensor.full_tensor``, an all-gather: every rank calls it, in the same order). The
    adapter is small, so each rank briefly holding all of it costs little; the frozen model
    stays sharded."""
    full = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            full[name] = whole.detach().to("cpu", copy=True)
    return full


def champion_with_adapter(
    trained: torch.nn.Module, adapter: dict[str, torch.Tensor], champion_dir: Path
) -> PeftModel:
    """The champion, loaded on the CPU as the step loads it (``serving.load``: float32, an
    adapter registration merged onto its parents), with the trained model's LoRA config and
    the gathered ``adapter`` weights in it (every adapter tensor must find its place)."""
    config = trained.get_base_model().config
    champion, _ = load(  # the champion's own code (auto_map) already ran in this process
        champion_dir,
        for_training=True,
        trust_remote_code=bool(getattr(config, "auto_map", None)),
        device="cpu",
    )
    model = get_peft_model(champion, trained.peft_config["default"])
    missing = set(adapter) - {n for n, p in model.named_parameters() if p.requires_grad}
    if missing:
        raise RuntimeError(
            f"gathered adapter tensors with no place in the model: {sorted(missing)}"
        )
    model.load_state_dict(adapter, strict=False)
    return model
