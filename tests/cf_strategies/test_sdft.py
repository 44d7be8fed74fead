"""SDFT: the student's own greedy answers, distilled toward the start-of-task model that has seen
the demonstration (x ⊕ y ⊕ x), by the full-vocabulary reverse KL; the task loss is replaced."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cf_strategies import build_strategies, train_task
from cf_strategies.base import TaskContext, greedy_answers
from cf_strategies.registry import validate_spec
from cf_strategies.sdft import prompt_and_answer, reverse_kl
from cf_strategies.trainer import total_loss
from tests.cf_strategies.tiny_models import EOS, PAD, lm_loss, tiny_lora, token_batch


def _sdft(**options):
    sdft = build_strategies("sdft", {"sdft": options})[0]
    sdft.prepare(TaskContext(pad_token_id=PAD, eos_token_id=EOS))
    return sdft


def test_reverse_kl_is_the_student_weighted_log_ratio():
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    p = F.softmax(student, -1)
    expected = (p * (F.log_softmax(student, -1) - F.log_softmax(teacher, -1))).sum(-1)
    torch.testing.assert_close(reverse_kl(student, teacher), expected)
    assert torch.allclose(reverse_kl(teacher, teacher), torch.zeros(5), atol=1e-6)


def test_the_loss_is_the_kl_on_the_students_answers_toward_the_demonstrated_base():
    model = tiny_lora()
    base = copy.deepcopy(model).eval()
    batch = token_batch(3, seed=2)
    sdft = _sdft(max_new_tokens=4, answer_margin=1)
    sdft.before_task(model)
    assert sdft.teacher.frozen is None  # LoRA: the teacher is the adapter disabled, no copy

    pairs = [prompt_and_answer({k: v[i] for k, v in batch.items()}) for i in range(3)]
    budget = min(4, max(len(y) for _, y in pairs) + 1)
    own = greedy_answers(model, [x for x, _ in pairs], budget, PAD, EOS)
    model.train()
    loss, outputs, student = total_loss(model, batch, [sdft], lm_loss, step=0)
    for i, ((x, _), a) in enumerate(zip(pairs, own, strict=True)):
        n = len(x) + len(a)
        assert student["input_ids"][i, :n].tolist() == x + a  # the student's own answer
        assert student["labels"][i, : len(x)].eq(-100).all()
        assert student["labels"][i, len(x) : n].tolist() == a

    expected = []
    with torch.no_grad(), base.disable_adapter():
        for i, ((x, y), a) in enumerate(zip(pairs, own, strict=True)):
            context = x + y + x  # the demonstration's context
            t = base(input_ids=torch.tensor([context + a])).logits[0, len(context) - 1 : -1]
            s = outputs.logits[i, len(x) - 1 : len(x) + len(a) - 1]
            expected.append(reverse_kl(s, t))
    torch.testing.assert_close(loss, torch.cat(expected).mean())  # no CE(y) term
    assert loss > 0  # the demonstration changes what the base predicts
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_sft_weight_adds_the_demonstrations_own_loss():
    model = tiny_lora()
    batch = token_batch(3, seed=2)
    plain, mixed = _sdft(), _sdft(sft_weight=0.5)
    for s in (plain, mixed):
        s.before_task(model)
    model.train()
    kl, *_ = total_loss(model, batch, [plain], lm_loss, step=0)
    both, *_ = total_loss(model, batch, [mixed], lm_loss, step=0)
    torch.testing.assert_close(both, kl + 0.5 * model(**batch).loss)


def test_training_brings_the_student_to_its_teacher():
    model = tiny_lora(seed=1)
    data = [token_batch(4, seed=s) for s in range(2)] * 15
    sdft = _sdft(max_new_tokens=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = train_task(model, data, [sdft], opt, lm_loss)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)


def test_without_lora_the_teacher_is_a_frozen_copy():
    from tests.cf_strategies.tiny_models import tiny_llm

    model = tiny_llm()
    sdft = _sdft()
    sdft.before_task(model)
    frozen = sdft.teacher.frozen
    assert frozen is not None and not any(p.requires_grad for p in frozen.parameters())
    sdft.after_task(model)
    assert sdft.teacher.frozen is None


def test_it_combines_with_regularisers_not_with_strategies_that_add_rows():
    assert validate_spec("sdft+ewc") == ["sdft", "ewc"]
    for spec in ("sdft+replay", "replay+sdft", "self_rehearsal+sdft"):
        with pytest.raises(ValueError, match="replaces the task loss"):
            validate_spec(spec)
