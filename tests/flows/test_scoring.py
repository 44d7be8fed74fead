import pytest
import torch

from flows.core.data import Example
from flows.scoring.scoring import choice_scores, first_choice_named, generate, generation_correct
from flows.steps.modeling import format_prompt, load_model


def ex(answers, choices=(), prompt="What is the capital of Ghana?", scoring="generate"):
    return Example(
        id="x",
        messages=[{"role": "user", "content": prompt}],
        completion=answers[0],
        answers=list(answers),
        task="t",
        choices=list(choices),
        scoring=scoring,
    )


def test_first_choice_named_takes_the_earliest_mention():
    choices = ["Arts", "History", "Physical sciences"]
    assert first_choice_named("This is about History, not Arts.", choices) == "History"
    assert first_choice_named("physical sciences!", choices) == "Physical sciences"
    assert first_choice_named("Hist", choices) is None


def test_generation_match_with_and_without_choices():
    assert generation_correct("The capital of Ghana is Accra.", ex(["Accra"]))
    assert not generation_correct("The capital of Ghana is Kumasi.", ex(["Accra"]))
    assert not generation_correct("Accrabad", ex(["Accra"]))  # whole words only
    topics = ex(["History"], choices=["Arts", "History"])
    assert generation_correct("History", topics)
    assert not generation_correct("Arts and History", topics)  # the first named choice counts


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_batched_generation_equals_one_by_one(tiny):
    model, tok = tiny
    items = [ex(["a"], prompt=p) for p in ["Short?", "A much longer question about Ghana here?"]]
    batched = generate(model, tok, items, False, 6, batch_size=2)
    single = [generate(model, tok, [i], False, 6, batch_size=1)[0] for i in items]
    assert batched == single


def test_choice_scores_matches_a_full_forward(tiny):
    model, tok = tiny
    item = ex(["Accra"], choices=["Accra", "Kumasi town"], scoring="choice")
    got = choice_scores(model, tok, [item], False, batch_size=4)[0]
    prompt = tok(format_prompt(tok, item.messages, False), add_special_tokens=False)["input_ids"]
    for choice, value in zip(item.choices, got, strict=True):
        target = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = torch.stack([logp[len(prompt) - 1 + k, t] for k, t in enumerate(target)]).mean()
        assert value == pytest.approx(float(expected), abs=1e-4)
