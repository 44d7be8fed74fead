"""cf_strategies: forgetting-prevention strategies for continual fine-tuning.

Depends on torch, transformers, peft and pydantic (typed options) only. Build strategies by name::

    from cf_strategies import build_strategies, ContinualTrainer
    strategies = build_strategies("ewc+replay", {"ewc": {"lambda_": 100.0}})
    ContinualTrainer(model=model, args=args, train_dataset=ds, strategies=strategies).train()
"""

# Each strategy module registers itself on import.
from cf_strategies import ewc, hlr, l2, naive, si  # noqa: F401  (regularisation family)

# isort: split
from cf_strategies import der, label_smoothing, lwf, replay, self_rehearsal  # noqa: F401  (replay and distillation family)

# isort: split
from cf_strategies import sdft  # noqa: F401  (on-policy self-distillation)

# isort: split
from cf_strategies import ilora, wise  # noqa: F401  (fast/slow learners, weight-space interpolation)

# isort: split
from cf_strategies import packnet, progressive  # noqa: F401  (parameter isolation)
from cf_strategies.base import (
    BASE,
    Strategy,
    TaskContext,
    snapshot,
    trainable_parameters,
    using_task,
)
from cf_strategies.registry import (
    STRATEGIES,
    build_strategies,
    register,
    split_spec,
    strategy_options,
    validate_spec,
)
from cf_strategies.trainer import (
    ContinualTrainer,
    NonFiniteLossError,
    checkpoint_problem,
    latest_checkpoint,
    remove_checkpoints,
    train_task,
)


def save_strategies(strategies: list[Strategy], folder) -> None:
    """Save every strategy's state into one folder (one file pair per strategy)."""
    for s in strategies:
        s.save(folder)


def load_strategies(strategies: list[Strategy], folder) -> None:
    """Load what ``save_strategies`` wrote; strategies without saved state stay fresh."""
    for s in strategies:
        s.load(folder)


__all__ = [
    "BASE",
    "STRATEGIES",
    "ContinualTrainer",
    "NonFiniteLossError",
    "Strategy",
    "TaskContext",
    "build_strategies",
    "checkpoint_problem",
    "latest_checkpoint",
    "load_strategies",
    "register",
    "remove_checkpoints",
    "save_strategies",
    "snapshot",
    "split_spec",
    "strategy_options",
    "train_task",
    "trainable_parameters",
    "using_task",
    "validate_spec",
]
