"""Naive fine-tuning: no protection at all. The control every other strategy is measured against."""

from cf_strategies.base import Strategy
from cf_strategies.registry import register


@register
class Naive(Strategy):
    """Plain fine-tuning: loss = task loss."""

    name = "naive"
    stores = "nothing"
    rank_safe = shard_safe = True
    flattening_safe = True  # the task loss alone
