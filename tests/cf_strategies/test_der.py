"""DER / DER++: the stored logits are the insertion-time ones, the loss is α·MSE + β·CE, and the
KL variant is the top-k + rest distillation (0 at the teacher, a hand-computed value)."""

import math

import pytest
import torch
import torch.nn.functional as F

from cf_strategies import build_strategies, train_task
from cf_strategies.buffer import collate, target_positions, target_rows
from cf_strategies.der import INDEX, LOGITS, REST, STORED, UNKNOWN_REST
from tests.cf_strategies.tiny_models import (
    TinyClassifier,
    ce_loss,
    class_batches,
    lm_loss,
    tiny_llm,
    token_batch,
)


def _der(**options):
    return build_strategies("der", {"der": options})[0]


def test_stored_classifier_logits_are_the_ones_at_insertion():
    model = TinyClassifier()
    der = _der(buffer_size=100, logit_dtype="float32")
    data = class_batches(2, task=0)
    with torch.no_grad():
        at_insertion = {
            tuple(b["x"][i].tolist()): model(b["x"], b["task"])[i] for b in data for i in range(8)
        }
    der.after_task(model, data)
    train_task(
        model,
        class_batches(3, task=1, seed=1),
        [der],
        torch.optim.SGD(model.parameters(), 0.5),
        ce_loss,
    )

    old = [ex for ex, t in zip(der.buffer.examples, der.buffer.tasks, strict=True) if t == 0]
    assert len(old) == 16
    for ex in old:
        expected = at_insertion[tuple(ex["x"].tolist())]
        assert torch.equal(ex[LOGITS], expected)  # exactly the insertion-time logits
        with torch.no_grad():
            now = model(ex["x"][None], ex["task"][None])[0]
        assert not torch.allclose(now, expected)  # ... not the current model's


def test_lm_keeps_top_k_logits_at_supervised_positions_only():
    model = tiny_llm()
    der = _der(buffer_size=10, top_k=5)
    batch = token_batch(4, seed=3)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    der.after_task(model, [batch])
    mask = target_positions(batch)
    assert len(der.buffer) == 4
    for ex in der.buffer.examples:  # buffer order is free: find each example's batch row
        row = next(
            r
            for r in range(4)
            if torch.equal(batch["input_ids"][r, : len(ex["input_ids"])], ex["input_ids"])
        )
        values, index = full[row][mask[row]].topk(5, dim=-1)
        assert ex[LOGITS].dtype == torch.float16 and ex[INDEX].dtype == torch.int32
        assert ex[LOGITS].shape == (int(mask[row].sum()), 5)
        assert torch.equal(ex[INDEX].long(), index)
        torch.testing.assert_close(ex[LOGITS].float(), values, atol=2e-3, rtol=1e-3)
        # the log of the teacher's probability mass on the other V − k tokens, in float32
        rest = full[row][mask[row]].scatter(-1, index, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(ex[REST], rest - full[row][mask[row]].logsumexp(-1))
        # memory per example: P positions x (k x (2 bytes value + 4 bytes index) + 4 bytes rest)
        stored = ex[LOGITS].nbytes + ex[INDEX].nbytes + ex[REST].nbytes
        assert stored == int(mask[row].sum()) * (5 * 6 + 4)


def test_derpp_loss_is_alpha_mse_plus_beta_ce_on_the_buffer():
    model = TinyClassifier()
    der = _der(alpha=0.3, beta=0.7, buffer_size=6, ratio=1.0, logit_dtype="float32")
    der.after_task(model, class_batches(2, n=4, classes=(0, 1, 2, 3)))
    with torch.no_grad():  # move the model so the stored logits no longer match it
        model.head.weight.add_(0.5)
    new = class_batches(1, n=8, classes=(4, 5), seed=2)[0]  # 8 >= buffer: each draw is all of it
    loss = der.extra_loss(model, new, None)

    buf = _buffered_inputs(der)
    stored = torch.stack([ex[LOGITS] for ex in der.buffer.examples])
    logits = model(buf["x"])
    expected = 0.3 * F.mse_loss(logits, stored) + 0.7 * F.cross_entropy(logits, buf["labels"])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0

    der.beta = 0.0  # plain DER: the logit term only
    torch.testing.assert_close(der.extra_loss(model, new, None), 0.3 * F.mse_loss(logits, stored))


def test_lm_der_loss_matches_the_student_at_the_stored_indices():
    model = tiny_llm()
    der = _der(alpha=1.0, beta=0.5, buffer_size=3, top_k=4, logit_dtype="float32")
    der.after_task(model, [token_batch(3, seed=1)])
    new = token_batch(4, seed=2)
    # the model has not moved: the top-k logits match, only DER++'s label term is left
    buf = _buffered_inputs(der)
    with torch.no_grad():
        rows = model(input_ids=buf["input_ids"], attention_mask=buf["attention_mask"]).logits[
            target_positions(buf)
        ]
        ce = F.cross_entropy(rows, target_rows(buf))
        loss = der.extra_loss(model, new, None)
    torch.testing.assert_close(loss, 0.5 * ce, atol=1e-5, rtol=1e-4)


def _buffered_inputs(der):
    return collate([{k: v for k, v in ex.items() if k not in STORED} for ex in der.buffer.examples])


def _kl_der(**options):
    options = {"alpha": 1.0, "beta": 0.0, "top_k": 4, "logit_dtype": "float32", **options}
    return _der(logit_loss="kl", **options)


def test_top_k_kl_is_zero_with_zero_gradient_at_the_teacher():
    """A student whose logits are the stored ones (up to an offset per row) has nothing to learn:
    the term and its gradient are 0 (renormalising the teacher's top-k alone left −log Σ_K p)."""
    der = _kl_der(temperature=2.0)
    z = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 3
    stored = [der._compress(row) for row in z]
    stored = {k: torch.stack([s[k] for s in stored]) for k in STORED}
    for student in (z.clone(), z + torch.arange(5.0)[:, None]):
        student.requires_grad_()
        loss = der.logit_term(student, stored)
        (grad,) = torch.autograd.grad(loss, student)
        assert abs(loss.item()) < 1e-6 and grad.abs().max() < 1e-6

    model = tiny_llm()  # the same through the strategy: the model has not moved since insertion
    der.after_task(model, [token_batch(3, seed=1)])
    loss = der.extra_loss(model, token_batch(4, seed=2), None)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert abs(loss.item()) < 1e-6
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-5


def test_top_k_kl_by_hand_on_four_classes():
    """Teacher logits (2, 1, 0, −1), top-2 kept, a student at (0, 0, 0, 0): outcomes {0}, {1} and
    the rest {2, 3}, q = (e², e, 1 + e⁻¹)/S, p = (¼, ¼, ½); at T = 2 both become ∝ their √."""
    model = torch.nn.Linear(1, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0]))
    batch = {"x": torch.zeros(1, 1), "labels": torch.tensor([0])}
    e = math.e
    q = [v / (e**2 + e + 1 + 1 / e) for v in (e**2, e, 1 + 1 / e)]
    p = [0.25, 0.25, 0.5]
    for t in (1.0, 2.0):
        der = _kl_der(alpha=0.5, top_k=2, buffer_size=1, temperature=t)
        der.after_task(model, [batch])
        ex = der.buffer.examples[0]
        assert ex[INDEX].tolist() == [0, 1] and ex[LOGITS].tolist() == [2.0, 1.0]
        assert float(ex[REST]) == pytest.approx(math.log(q[2]), abs=1e-6)
        with torch.no_grad():
            model.bias.zero_()
            loss = der.extra_loss(model, batch, None)
            model.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0]))
        qt = [v ** (1 / t) / sum(w ** (1 / t) for w in q) for v in q]
        pt = [v ** (1 / t) / sum(w ** (1 / t) for w in p) for v in p]
        expected = 0.5 * t * t * sum(a * math.log(a / b) for a, b in zip(qt, pt, strict=True))
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert expected > 0.05


def test_top_k_kl_pulls_a_moved_student_back_to_the_teacher():
    model = tiny_llm()
    der = _kl_der(buffer_size=3, temperature=2.0)
    der.after_task(model, [token_batch(3, seed=1)])
    with torch.no_grad():  # move the model away from what was stored
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        loss = der.extra_loss(model, token_batch(4, seed=2), None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-3
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.7 * losses[0]


def test_buffer_saved_without_rest_masses_distils_on_the_kept_tokens(tmp_path):
    """A top-k buffer saved before the rest mass was kept still loads; its rows compare the
    teacher's and the student's distributions renormalised over the stored tokens."""
    model = tiny_llm()
    old = _kl_der(buffer_size=3, temperature=2.0)
    old.after_task(model, [token_batch(3, seed=1)])
    for ex in old.buffer.examples:
        del ex[REST]
    old.save(tmp_path)
    der = _kl_der(buffer_size=3, temperature=2.0)
    der.load(tmp_path)
    assert all(bool((ex[REST] == UNKNOWN_REST).all()) for ex in der.buffer.examples)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    buf = _buffered_inputs(der)
    stored = torch.cat([ex[LOGITS] for ex in der.buffer.examples])
    index = torch.cat([ex[INDEX] for ex in der.buffer.examples]).long()
    with torch.no_grad():
        rows = model(input_ids=buf["input_ids"], attention_mask=buf["attention_mask"]).logits[
            target_positions(buf)
        ]
        log_p = F.log_softmax(rows.gather(-1, index) / 2.0, -1)
        log_q = F.log_softmax(stored / 2.0, -1)
        expected = 4.0 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        loss = der.extra_loss(model, token_batch(4, seed=2), None)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    der.after_task(model, [token_batch(3, seed=5)])  # old and new examples save together
    der.save(tmp_path)


def test_derpp_trains_a_causal_lm_over_two_tasks_and_round_trips(tmp_path):
    model = tiny_llm()
    der = _der(buffer_size=4, top_k=8, ratio=0.5)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    task_losses = []

    def loss_fn(m, batch):
        loss, outputs = lm_loss(m, batch)
        task_losses.append(loss.item())
        return loss, outputs

    for task in range(2):
        data = [token_batch(4, seed=10 * task + s) for s in range(2)]
        losses = train_task(model, data, [der], opt, loss_fn)
        extra = [a - b for a, b in zip(losses, task_losses[-2:], strict=True)]
        if task == 0:  # nothing buffered yet: the task loss alone
            assert extra == [0.0, 0.0]
        else:  # the α·MSE + β·CE terms on the first task's examples
            assert min(extra) > 0.1
    der.save(tmp_path)
    again = _der()
    again.load(tmp_path)
    assert again.task == 2 and again.buffer.fingerprint() == der.buffer.fingerprint()
    assert all(
        torch.equal(a[LOGITS], b[LOGITS])
        for a, b in zip(der.buffer.examples, again.buffer.examples, strict=True)
    )
