"""DER / DER++: the stored logits are the insertion-time ones, and the loss is α·MSE + β·CE."""

import torch
import torch.nn.functional as F
from tiny_lm import TinyClassifier, ce_loss, class_batches, lm_loss, tiny_lm, token_batch

from cf_strategies import build_strategies, train_task
from cf_strategies.buffer import collate, target_positions, target_rows
from cf_strategies.der import INDEX, LOGITS


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
    model = tiny_lm()
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
        # memory per example: P positions x k x (2 bytes value + 4 bytes index)
        stored = ex[LOGITS].nbytes + ex[INDEX].nbytes
        assert stored == int(mask[row].sum()) * 5 * 6


def test_derpp_loss_is_alpha_mse_plus_beta_ce_on_the_buffer():
    model = TinyClassifier()
    der = _der(alpha=0.3, beta=0.7, buffer_size=6, ratio=1.0, logit_dtype="float32")
    der.after_task(model, class_batches(2, n=4, classes=(0, 1, 2, 3)))
    with torch.no_grad():  # move the model so the stored logits no longer match it
        model.head.weight.add_(0.5)
    new = class_batches(1, n=8, classes=(4, 5), seed=2)[0]  # 8 >= buffer: each draw is all of it
    loss = der.extra_loss(model, new, None)

    buf = collate([{k: v for k, v in ex.items() if k != LOGITS} for ex in der.buffer.examples])
    stored = torch.stack([ex[LOGITS] for ex in der.buffer.examples])
    logits = model(buf["x"])
    expected = 0.3 * F.mse_loss(logits, stored) + 0.7 * F.cross_entropy(logits, buf["labels"])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0

    der.beta = 0.0  # plain DER: the logit term only
    torch.testing.assert_close(der.extra_loss(model, new, None), 0.3 * F.mse_loss(logits, stored))


def test_lm_der_loss_matches_the_student_at_the_stored_indices():
    model = tiny_lm()
    der = _der(alpha=1.0, beta=0.5, buffer_size=3, top_k=4, logit_dtype="float32")
    der.after_task(model, [token_batch(3, seed=1)])
    new = token_batch(4, seed=2)
    # the model has not moved: the top-k logits match, only DER++'s label term is left
    buf = collate(
        [{k: v for k, v in ex.items() if k not in (LOGITS, INDEX)} for ex in der.buffer.examples]
    )
    with torch.no_grad():
        rows = model(input_ids=buf["input_ids"], attention_mask=buf["attention_mask"]).logits[
            target_positions(buf)
        ]
        ce = F.cross_entropy(rows, target_rows(buf))
        loss = der.extra_loss(model, new, None)
    torch.testing.assert_close(loss, 0.5 * ce, atol=1e-5, rtol=1e-4)


def test_lm_kl_term_is_sparse_distillation_at_the_stored_indices():
    """``logit_loss="kl"``: T²·Σ q (log q − log p) with q the stored top-k renormalised and p the
    student's full-vocabulary softmax read at those indices."""
    model = tiny_lm()
    der = _der(alpha=2.0, beta=0.0, buffer_size=3, top_k=4, logit_dtype="float32",
               logit_loss="kl", temperature=2.0)  # fmt: skip
    der.after_task(model, [token_batch(3, seed=1)])
    with torch.no_grad():  # move the model away from what was stored
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    buf = collate(
        [{k: v for k, v in ex.items() if k not in (LOGITS, INDEX)} for ex in der.buffer.examples]
    )
    stored = torch.cat([ex[LOGITS] for ex in der.buffer.examples])
    index = torch.cat([ex[INDEX] for ex in der.buffer.examples]).long()
    with torch.no_grad():
        rows = model(input_ids=buf["input_ids"], attention_mask=buf["attention_mask"]).logits[
            target_positions(buf)
        ]
        log_p = F.log_softmax(rows / 2.0, -1).gather(-1, index)
        q = F.softmax(stored / 2.0, -1)
        expected = 2.0 * 4.0 * (q * (q.log() - log_p)).sum(-1).mean()
        loss = der.extra_loss(model, token_batch(4, seed=2), None)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    assert loss > 0


def test_derpp_trains_a_causal_lm_over_two_tasks_and_round_trips(tmp_path):
    model = tiny_lm()
    der = _der(buffer_size=4, top_k=8, ratio=0.5)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for task in range(2):
        data = [token_batch(4, seed=10 * task + s) for s in range(2)]
        losses = train_task(model, data, [der], opt, lm_loss)
        assert all(torch.isfinite(torch.tensor(losses)))
    der.save(tmp_path)
    again = _der()
    again.load(tmp_path)
    assert again.task == 2 and again.buffer.fingerprint() == der.buffer.fingerprint()
    assert all(
        torch.equal(a[LOGITS], b[LOGITS])
        for a, b in zip(der.buffer.examples, again.buffer.examples, strict=True)
    )
