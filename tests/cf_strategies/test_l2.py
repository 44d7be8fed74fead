"""L2-SP: the penalty toward the weights at the start of each task, and its gradient."""

import torch

from cf_strategies import train_task
from cf_strategies.l2 import L2
from cf_strategies.naive import Naive
from tests.cf_strategies.tiny_models import mlp_batches, mlp_loss, tiny_mlp


def test_penalty_and_gradient_toward_the_start_of_the_task():
    model, l2 = tiny_mlp(), L2(lambda_=4.0)
    l2.before_task(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(l2.extra_loss(model, None, None).detach()) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    penalty = l2.extra_loss(model, None, None)
    penalty.backward()
    value = 0.0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 4.0 * (p.detach() - start[n]))
        value += 2.0 * ((p.detach() - start[n]) ** 2).sum()
    torch.testing.assert_close(penalty.detach(), value)


def test_each_task_re_anchors_and_no_state_is_kept():
    model, l2 = tiny_mlp(), L2(lambda_=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_task(model, mlp_batches(), [l2], optimizer, mlp_loss)
    assert l2.state_dict() == {}
    l2.before_task(model)  # the next task starts at the current weights: zero penalty
    assert float(l2.extra_loss(model, None, None).detach()) == 0.0


def test_a_strong_pull_keeps_the_weights_near_the_start():
    def drift(strategy):
        model = tiny_mlp()
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        train_task(model, mlp_batches(), [strategy], optimizer, mlp_loss, epochs=3)
        return sum(
            float((p.detach() - s).norm()) for p, s in zip(model.parameters(), start, strict=True)
        )

    assert drift(L2(lambda_=10.0)) < 0.5 * drift(Naive())
