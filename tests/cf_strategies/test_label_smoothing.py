"""Label smoothing: task CE + the extra term is exactly the label-smoothed cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from cf_strategies import build_strategies
from cf_strategies.buffer import target_positions
from cf_strategies.registry import StrategyOptionError
from tests.cf_strategies.tiny_models import TinyClassifier, class_batches, tiny_llm, token_batch


def _smoothing(epsilon):
    return build_strategies("label_smoothing", {"label_smoothing": {"epsilon": epsilon}})[0]


def test_causal_lm_loss_becomes_label_smoothed_cross_entropy():
    model = tiny_llm()
    batch = token_batch(4, seed=1)
    outputs = model(**batch)
    total = outputs.loss + _smoothing(0.2).extra_loss(model, batch, outputs)
    rows = outputs.logits[target_positions(batch)]
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    torch.testing.assert_close(total, F.cross_entropy(rows, targets, label_smoothing=0.2))


def test_classifier_loss_becomes_label_smoothed_cross_entropy():
    model = TinyClassifier()
    batch = class_batches(1, classes=(0, 3, 5))[0]
    logits = model(batch["x"])
    total = F.cross_entropy(logits, batch["labels"]) + _smoothing(0.1).extra_loss(
        model, batch, logits
    )
    torch.testing.assert_close(total, F.cross_entropy(logits, batch["labels"], label_smoothing=0.1))


def test_zero_epsilon_adds_nothing_and_bad_epsilon_is_refused():
    batch = class_batches(1)[0]
    logits = TinyClassifier()(batch["x"])
    assert _smoothing(0.0).extra_loss(None, batch, logits) == 0
    with pytest.raises(StrategyOptionError, match="option 'epsilon': .*less than or equal to 1"):
        _smoothing(1.5)
