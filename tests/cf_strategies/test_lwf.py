"""LwF: the LoRA teacher is the base model under disable_adapter(); the loss is T²·KL."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from cf_strategies import build_strategies, train_task
from cf_strategies.buffer import target_positions
from cf_strategies.registry import StrategyOptionError
from tests.cf_strategies.tiny_models import (
    TinyClassifier,
    ce_loss,
    class_batches,
    tiny_llm,
    token_batch,
)


def _lwf(**options):
    return build_strategies("lwf", {"lwf": options})[0]


def _lora(model):
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # a trained adapter: B != 0, so adapted and base outputs differ
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model


def _kd(student, teacher, t):
    p_teacher = F.softmax(teacher / t, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, dim=-1))).sum(-1)
    return kl.mean() * t * t


def test_lora_teacher_under_disable_adapter_equals_the_base_model():
    base = tiny_llm()
    reference = copy.deepcopy(base).eval()
    model = _lora(base)
    model.train()
    lwf = _lwf()
    lwf.before_task(model)
    assert lwf.uses_adapter(model) and lwf.frozen is None  # no copy of the model in memory

    batch = token_batch(4, seed=1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = target_positions(batch)
    teacher = lwf.teacher_rows(model, batch, mask)
    with torch.no_grad():
        base_rows = reference(**inputs).logits[mask]
        adapted_rows = model(**inputs).logits[mask]
    torch.testing.assert_close(teacher, base_rows, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted_rows, base_rows, atol=1e-2)
    assert model.training  # train mode and the adapter are back afterwards
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[mask], adapted_rows)


def test_teacher_runs_the_lm_head_only_at_supervised_positions():
    model = _lora(tiny_llm())
    lwf = _lwf()
    lwf.before_task(model)
    seen = []
    head = model.get_base_model().lm_head
    handle = head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    batch = token_batch(4, seed=2)
    lwf.teacher_rows(model, batch, target_positions(batch))
    handle.remove()
    assert seen == [torch.Size([int(target_positions(batch).sum()), 32])]


def test_lwf_loss_is_t2_kl_on_supervised_or_all_positions():
    model = _lora(tiny_llm())
    batch = token_batch(4, seed=3)
    outputs = model(**batch)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    for positions in ("labels", "all"):
        lwf = _lwf(alpha=0.5, temperature=2.0, positions=positions)
        lwf.before_task(model)
        loss = lwf.extra_loss(model, batch, outputs)
        mask = target_positions(batch, positions)
        expected = 0.5 * _kd(outputs.logits[mask], base_logits[mask], 2.0)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
        assert loss.requires_grad


def test_non_target_distils_the_renormalised_distribution_without_the_label():
    """NCKD: the KL of the distributions over the other tokens; the label's logit gets no
    gradient from it, so the task loss alone decides how likely the label becomes."""
    model = _lora(tiny_llm())
    batch = token_batch(4, seed=3)
    outputs = model(**batch)
    mask = target_positions(batch)
    labels = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    with torch.no_grad(), model.disable_adapter():
        teacher = model(input_ids=batch["input_ids"]).logits[mask]
    student = outputs.logits[mask]
    keep = torch.ones_like(student, dtype=torch.bool).scatter(-1, labels[:, None], False)
    rows = len(labels)
    expected = 0.5 * _kd(student[keep].view(rows, -1), teacher[keep].view(rows, -1), 2.0)
    lwf = _lwf(alpha=0.5, temperature=2.0, non_target=True)
    lwf.before_task(model)
    loss = lwf.extra_loss(model, batch, outputs)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    (grad,) = torch.autograd.grad(loss, outputs.logits)
    assert grad[mask].gather(-1, labels[:, None]).abs().max() < 1e-9  # the label is untouched
    assert grad[mask].abs().max() > 1e-4
    with pytest.raises(ValueError, match="non_target needs"):
        _lwf(non_target=True, positions="all")


def test_fresh_adapter_gives_zero_distillation_loss():
    model = get_peft_model(tiny_llm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lwf = _lwf()
    lwf.before_task(model)
    batch = token_batch(4)
    loss = lwf.extra_loss(model, batch, model(**batch))
    assert loss.abs() < 1e-6  # LoRA B starts at zero: student == teacher


def test_full_fine_tuning_distils_from_a_frozen_copy():
    model = TinyClassifier()
    lwf = _lwf(skip_first_task=True)
    opt = torch.optim.SGD(model.parameters(), 0.5)
    train_task(model, class_batches(2), [lwf], opt, ce_loss)
    assert lwf.frozen is None and lwf.tasks_done == 1  # nothing to distil on the first task

    lwf.before_task(model)
    before = copy.deepcopy(lwf.frozen.state_dict())
    assert not any(p.requires_grad for p in lwf.frozen.parameters())
    batch = class_batches(1, classes=(2, 3), seed=4)[0]
    assert lwf.extra_loss(model, batch, model(batch["x"])).abs() < 1e-6
    for _ in range(3):
        loss, _ = ce_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in lwf.frozen.state_dict().items())
    logits = model(batch["x"])
    with torch.no_grad():
        teacher = lwf.frozen(batch["x"])
    torch.testing.assert_close(lwf.extra_loss(model, batch, logits), _kd(logits, teacher, 2.0))


def test_seen_classes_and_multi_head_distil_only_earlier_outputs():
    model = TinyClassifier()
    seen = _lwf(classes="seen", skip_first_task=True)
    seen.after_task(model, class_batches(2, classes=(0, 1)))
    seen.before_task(model)
    with torch.no_grad():
        model.head.bias[:2] += torch.tensor([1.0, -1.0])
        model.head.bias[2:] += 5.0  # new classes' logits do not count
    batch = class_batches(1, classes=(2, 3))[0]
    logits = model(batch["x"])
    with torch.no_grad():
        teacher = seen.frozen(batch["x"])
    torch.testing.assert_close(
        seen.extra_loss(model, batch, logits), _kd(logits[:, :2], teacher[:, :2], 2.0)
    )

    heads = _lwf(multi_head=True, skip_first_task=True)
    for task in range(2):
        heads.after_task(model, class_batches(1, task=task))
    assert heads.old_heads == [0, 1]
    heads.before_task(model)
    with torch.no_grad():
        model.head.bias += torch.arange(6.0)  # moves heads 0 and 1 (and the new head 2)
    batch = class_batches(1, task=2, seed=5)[0]
    loss = heads.extra_loss(model, batch, None)
    expected = 0.0
    for t in (0, 1):
        task = torch.full((8,), t)
        with torch.no_grad():
            teacher = heads.frozen(batch["x"], task)
        expected = expected + _kd(model(batch["x"], task), teacher, 2.0)
    torch.testing.assert_close(loss, expected)


def test_bad_options_name_the_choices():
    with pytest.raises(StrategyOptionError, match="option 'positions': .*'labels' or 'all'"):
        _lwf(positions="prompt")
    with pytest.raises(
        StrategyOptionError, match="option 'teacher': .*'auto', 'adapter' or 'copy'"
    ):
        _lwf(teacher="ema")
    with pytest.raises(StrategyOptionError, match="option 'temperature': .*greater than 0"):
        _lwf(temperature=0)
