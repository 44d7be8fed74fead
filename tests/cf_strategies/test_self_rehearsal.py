"""Self-rehearsal: the champion's greedy answers to old prompts become replay examples."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from cf_strategies import build_strategies, train_task
from cf_strategies.base import TaskContext, greedy_answers
from cf_strategies.self_rehearsal import SelfRehearsal
from tests.cf_strategies.tiny_models import EOS, PAD, lm_loss, tiny_llm, token_batch

PROMPTS = [[5, 9, 12], [7, 8, 30, 31, 40, 41], [50, 3]]


def _ssr(**options):
    return build_strategies("self_rehearsal", {"self_rehearsal": options})[0]


def _greedy(model, prompt, n):
    """Unpadded greedy decoding of one prompt, one token at a time (the reference)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_champion_answers_become_replay_examples_with_prompt_labels_masked():
    model = tiny_llm()
    ssr = _ssr(max_new_tokens=4, generation_batch_size=2, eos_token_id=63)
    ssr.add_prompts(PROMPTS)
    ssr.before_task(model)
    assert ssr.pending == [] and len(ssr.buffer) == 3
    assert ssr.buffer.tasks == [-1, -1, -1]  # prompts given before any task
    model.eval()
    by_prompt = {len(p): p for p in PROMPTS}
    for ex in ssr.buffer.examples:
        prompt = next(p for p in PROMPTS if ex["input_ids"][: len(p)].tolist() == p)
        answer = ex["input_ids"][len(prompt) :].tolist()
        # left-padded batch generation gives the same tokens as decoding each prompt alone
        expected = _greedy(model, prompt, 4)
        if 63 in expected:
            expected = expected[: expected.index(63) + 1]
        assert answer == expected
        assert ex["labels"].tolist() == [-100] * len(prompt) + answer
        assert ex["attention_mask"].tolist() == [1] * len(ex["input_ids"])
        del by_prompt[len(prompt)]
    assert not by_prompt


def test_answers_stop_after_end_of_sequence():
    model = tiny_llm()
    model.eval()
    first = _greedy(model, PROMPTS[0], 6)
    eos = first[2]
    ssr = _ssr(max_new_tokens=6, eos_token_id=eos)
    ssr.add_prompts(PROMPTS[:1], task=0)
    ssr.rehearse(model)
    (ex,) = ssr.buffer.examples
    assert ex["input_ids"][3:].tolist() == first[: first.index(eos) + 1]


def test_string_prompts_are_tokenized_and_the_tokenizer_gives_eos():
    class Tokenizer:
        eos_token_id = 1

        def __call__(self, text):
            return {"input_ids": [10 + ord(c) % 50 for c in text]}

    ssr = _ssr(max_new_tokens=2)
    ssr.add_prompts(["abc", "hello"], Tokenizer())
    assert ssr.eos_token_id == 1
    assert ssr.pending[0] == ([10 + ord(c) % 50 for c in "abc"], -1)


def test_task_data_is_never_stored_only_prompts_when_asked(tmp_path):
    model = tiny_llm()
    data = [token_batch(4, seed=s) for s in range(2)]
    private = _ssr()
    private.after_task(model, data)
    assert len(private.buffer) == 0 and private.pending == []

    harvest = _ssr(prompts_from_data=True, max_new_tokens=3, buffer_size=5)
    harvest.after_task(model, data)
    assert len(harvest.buffer) == 0 and len(harvest.pending) == 8
    first = data[0]
    answer_start = int((first["labels"][0] != -100).nonzero()[0])
    assert harvest.pending[0] == (first["input_ids"][0, :answer_start].tolist(), 0)

    harvest.save(tmp_path)
    loaded = _ssr()
    loaded.load(tmp_path)
    assert loaded.pending == harvest.pending

    harvest.before_task(model)  # at most buffer_size prompts are answered
    assert len(harvest.buffer) == 5 and harvest.buffer.tasks == [0] * 5
    for ex in harvest.buffer.examples:  # the stored answers are the model's, not the data's
        assert ex["input_ids"].tolist() not in [
            row.tolist() for b in data for row in b["input_ids"]
        ]


def test_self_rehearsal_mixes_its_answers_into_training():
    model = tiny_llm()
    ssr = _ssr(max_new_tokens=3, ratio=0.5, pad_token_id=PAD)
    ssr.add_prompts(PROMPTS)
    seen = []
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def loss_fn(m, batch):
        seen.append(batch["input_ids"].shape[0])
        return lm_loss(m, batch)

    train_task(model, [token_batch(4, seed=s) for s in range(2)], [ssr], opt, loss_fn)
    assert seen == [6, 6]  # 4 new + 2 rehearsed per step


def test_distillation_matches_the_champions_distribution_on_rehearsed_answers():
    """With ``distill_alpha`` the rehearsed rows carry no labels into the task loss; the extra
    term is α·T²·KL(champion ‖ model) at their answer positions: zero while the fresh LoRA
    adapter leaves the model as the champion, the hand-computed KL once it does not."""
    model = get_peft_model(tiny_llm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ssr = _ssr(max_new_tokens=3, ratio=0.5, pad_token_id=PAD, distill_alpha=2.0, temperature=2.0)
    ssr.add_prompts(PROMPTS)
    ssr.before_task(model)
    batch = token_batch(4, seed=0)
    mixed = ssr.augment_batch(model, batch)
    assert mixed["input_ids"].shape[0] == 6 and (mixed["labels"][4:] == -100).all()
    outputs = model(**mixed)
    assert torch.allclose(outputs.loss, lm_loss(model, batch)[0])  # new rows only
    assert float(ssr.extra_loss(model, mixed, outputs).detach()) == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():  # move the adapter: the model is no longer the champion
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    mixed = ssr.augment_batch(model, batch)
    rows, labels = slice(4, 6), ssr._rehearsed[1]
    outputs = model(**mixed)
    term = ssr.extra_loss(model, mixed, outputs).detach()
    answer = torch.zeros_like(labels, dtype=torch.bool)
    answer[:, :-1] = labels[:, 1:] != -100  # positions that predict an answer token
    with torch.no_grad(), model.disable_adapter():
        champion = model(input_ids=mixed["input_ids"][rows]).logits[answer]
    student = outputs.logits[rows][answer]
    kl = F.kl_div(
        F.log_softmax(student / 2, -1), F.log_softmax(champion / 2, -1),
        log_target=True, reduction="batchmean",
    )  # fmt: skip
    assert float(term) > 0.01
    assert float(term) == pytest.approx(float(2.0 * 4 * kl.detach()), rel=1e-4)


def test_distilled_rehearsal_composes_with_replay_of_longer_rows():
    """Replay after self-rehearsal appends longer rows, widening the batch the rehearsed rows
    are then read from; the distillation term must follow (it raised an IndexError)."""
    model = get_peft_model(tiny_llm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lwf, ssr, replay = build_strategies(
        "lwf+self_rehearsal+replay",
        {
            "lwf": {"alpha": 0.15},
            "self_rehearsal": {"max_new_tokens": 2, "ratio": 0.5, "distill_alpha": 5.0},
            "replay": {"ratio": 0.5},
        },
    )
    replay.after_task(model, [token_batch(4, prompt=(20, 24), answer=(8, 10), seed=7)])
    ssr.add_prompts(PROMPTS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2)
    shapes = []

    def loss_fn(m, batch):
        shapes.append(tuple(batch["input_ids"].shape))
        return lm_loss(m, batch)

    train_task(model, [token_batch(4, seed=s) for s in range(3)], [lwf, ssr, replay], opt, loss_fn)
    # 4 new rows + 2 rehearsed + 3 replayed (half of the 6 replay sees), as wide as the
    # replayed rows (>= 28 tokens)
    assert [n for n, _ in shapes] == [9, 9, 9] and min(w for _, w in shapes) >= 28


def test_prepare_queues_the_contexts_prompts_and_takes_its_token_ids():
    context = TaskContext(
        release="r2", pad_token_id=PAD, eos_token_id=EOS, rehearsal_prompts=PROMPTS[:2]
    )
    auto, fixed = _ssr(), _ssr(eos_token_id=63, pad_token_id=5)
    assert SelfRehearsal.uses_rehearsal_prompts and auto.uses_rehearsal_prompts
    for ssr in (auto, fixed):
        ssr.prepare(context)
        assert ssr.pending == [(PROMPTS[0], -1), (PROMPTS[1], -1)] and ssr.data_version == "r2"
    assert (auto.eos_token_id, auto.pad_token_id) == (EOS, PAD)
    assert (fixed.eos_token_id, fixed.pad_token_id) == (63, 5)


def test_rehearse_gives_the_greedy_answers_of_base():
    """Self-rehearsal's answers are ``base.greedy_answers`` (left padding, greedy, up to eos)."""
    model = tiny_llm()
    eos = _greedy(model.eval(), PROMPTS[1], 4)[1]  # an end-of-sequence the second answer meets
    ssr = _ssr(max_new_tokens=4, generation_batch_size=2, eos_token_id=eos)
    ssr.add_prompts(PROMPTS, task=0)
    assert ssr.rehearse(model) == 3
    answers = greedy_answers(model, PROMPTS, 4, PAD, eos, batch_size=2)
    assert len(answers[1]) == 2
    stored = {tuple(ex["input_ids"].tolist()) for ex in ssr.buffer.examples}
    assert stored == {tuple(p + a) for p, a in zip(PROMPTS, answers, strict=True)}
