"""Synaptic Intelligence: the path integral on a quadratic loss against its closed form, the
unregularised gradient, no cap and no negative importance, and the penalty's gradient."""

import pytest
import torch
from torch import nn

from cf_strategies import train_task
from cf_strategies.si import SynapticIntelligence
from tests.cf_strategies.tiny_models import mlp_batches, mlp_loss, tiny_mlp


class Quadratic(nn.Module):
    """L(θ) = ½ Σ a_k (θ_k − m_k)²: separable, so SI's importance has a closed form."""

    def __init__(self, theta0, a, m):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
        self.a = torch.tensor(a, dtype=torch.float64)
        self.m = torch.tensor(m, dtype=torch.float64)

    def loss(self, model=None, batch=None):
        return 0.5 * (self.a * (self.theta - self.m) ** 2).sum(), None


A, THETA0 = [1.0, 4.0, 1000.0], [2.0, -1.0, 0.5]
ETA, STEPS, XI = 0.01, 60, 1e-3


def test_importance_on_a_quadratic_matches_the_closed_form():
    q = Quadratic(THETA0, A, [0.0, 0.0, 0.0])
    si = SynapticIntelligence(c=1.0, xi=XI)
    loss_start = 0.5 * q.a * (q.theta.detach() - q.m) ** 2
    train_task(q, [None] * STEPS, [si], torch.optim.SGD(q.parameters(), lr=ETA), q.loss)

    a, d0 = q.a, torch.tensor(THETA0, dtype=torch.float64)
    r = 1 - ETA * a  # gradient descent: θ_t − m = r^t d0, g_t = a r^t d0, Δθ_t = −η g_t
    omega = ETA * a**2 * d0**2 * (1 - r ** (2 * STEPS)) / (1 - r**2)  # ω = Σ_t η g_t²
    delta = d0 * (r**STEPS - 1)  # θ_end − θ_start
    state = si.state_dict()
    torch.testing.assert_close(state["importance.theta"], (omega / (delta**2 + XI)).float())
    assert torch.equal(state["anchor.theta"], q.theta.detach())
    # The path integral is the drop in loss (exactly so as η → 0): checked on the slow coordinate.
    loss_end = 0.5 * a * (q.theta.detach() - q.m) ** 2
    assert omega[0] == pytest.approx(float(loss_start[0] - loss_end[0]), rel=0.01)
    # No cap: the stiff coordinate (a = 1000) gets an importance far above 1e-3
    assert state["importance.theta"][2] > 100


def test_second_task_uses_the_gradient_without_the_si_term():
    q = Quadratic(THETA0[:2], A[:2], [0.0, 0.0])
    si = SynapticIntelligence(c=2.0, xi=XI)
    train_task(q, [None] * STEPS, [si], torch.optim.SGD(q.parameters(), lr=ETA), q.loss)
    omega1 = si.state_dict()["importance.theta"].double()
    star = q.theta.detach().clone()

    q.m = torch.tensor([3.0, -2.0], dtype=torch.float64)  # task 2: another minimum
    theta, path = star.clone(), torch.zeros(2, dtype=torch.float64)
    for _ in range(STEPS):  # the same run by hand
        g_task = q.a * (theta - q.m)
        g_total = g_task + 2 * 2.0 * omega1 * (theta - star)
        path += -g_task * (-ETA * g_total)
        theta = theta - ETA * g_total
    train_task(q, [None] * STEPS, [si], torch.optim.SGD(q.parameters(), lr=ETA), q.loss)
    torch.testing.assert_close(q.theta.detach(), theta)
    expected = omega1 + path.clamp_min(0) / ((theta - star) ** 2 + XI)
    torch.testing.assert_close(
        si.state_dict()["importance.theta"].double(), expected, rtol=1e-5, atol=0
    )


def test_a_negative_path_integral_adds_no_importance():
    q = Quadratic([1.0, 1.0], [1.0, 1.0], [0.0, 0.0])
    si = SynapticIntelligence()
    ascent = torch.optim.SGD(q.parameters(), lr=ETA, maximize=True)  # the loss goes *up*
    train_task(q, [None] * 10, [si], ascent, q.loss)
    assert torch.equal(si.state_dict()["importance.theta"], torch.zeros(2))


def test_penalty_gradient_is_two_c_omega_times_distance():
    model, si = tiny_mlp(), SynapticIntelligence(c=0.7)
    g = torch.Generator().manual_seed(0)
    omega = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    anchor = {
        n: p.detach() + torch.randn(p.shape, generator=g) for n, p in model.named_parameters()
    }
    si.load_state_dict(
        {
            "coordinates": "weights",
            **{f"importance.{n}": o for n, o in omega.items()},
            **{f"anchor.{n}": a for n, a in anchor.items()},
        }
    )
    si.before_task(model)
    penalty = si.extra_loss(model, None, None)
    penalty.backward()
    total = 0.0
    for name, p in model.named_parameters():
        diff = p.detach() - anchor[name]
        torch.testing.assert_close(p.grad, 2 * 0.7 * omega[name] * diff)
        total += 0.7 * (omega[name] * diff**2).sum()
    torch.testing.assert_close(penalty.detach(), total)


def test_importance_is_recorded_with_adam_on_cpu():
    """A peer's SI is a no-op on CPU (its 'old parameters' alias the live ones): ours is not."""
    model, si = tiny_mlp(), SynapticIntelligence(c=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_task(model, mlp_batches(), [si], optimizer, mlp_loss, epochs=3)
    omega = [v for k, v in si.state_dict().items() if k.startswith("importance.")]
    assert all((o >= 0).all() for o in omega)
    assert sum(float(o.sum()) for o in omega) > 0
    assert si.extra_loss(model, None, None) is None  # between tasks: no working state
    si.before_task(model)
    assert float(si.extra_loss(model, None, None).detach()) == 0.0  # at θ*: zero penalty
