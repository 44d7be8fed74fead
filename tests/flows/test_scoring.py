import pytest
import torch

from flows.core.data import Example
from flows.scoring.scoring import (
    choice_scores,
    first_choice_named,
    generate,
    generation_correct,
    rouge_l,
)
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


def test_rouge_l_judges_a_release_answer_by_its_closeness():
    describe = ex(["1968 film by Stanley Kubrick"], scoring="rouge_l")
    assert rouge_l("A 1968 science fiction film by Stanley Kubrick", describe.answers[0]) == (
        pytest.approx(2 * (5 / 8) * 1 / (5 / 8 + 1))
    )
    assert generation_correct("A 1968 science fiction film by Stanley Kubrick", describe)
    assert not generation_correct("A film", describe)  # 2 of 5 words: F 0.29
    year = ex(["1588"], scoring="rouge_l")
    assert generation_correct("1588.", year)
    assert not generation_correct("The first year this text mentions is 1588", year)
    # words of every language count, not only ASCII letters (rouge-score's own tokenizer)
    assert generation_correct("Ciudad de México", ex(["ciudad de méxico"], scoring="rouge_l"))
    assert not generation_correct("Ciudad de Panamá", ex(["Zürich"], scoring="rouge_l"))


def test_release_items_without_choices_are_scored_by_rouge_l():
    from flows.core.data import release_example

    topic = {"id": "a", "prompt": "p", "completion": "Arts", "choices": ["Arts", "Law"]}
    free = {"id": "b", "prompt": "p", "completion": "a long answer"}
    scored = release_example(topic, "r").scoring, release_example(free, "r").scoring
    assert scored == ("generate", "rouge_l")


def test_a_new_task_budget_follows_its_longest_reference(params_file, tiny_model_dir):
    """An answer longer than a fixed 8-token budget could never be scored right."""
    from flows.core.config import load_params
    from flows.steps.evaluate import EvaluateStep, Scorer

    params = load_params(params_file, {"evaluate.new_task_max_new_tokens": None})
    long_answer = "Intergovernmental forum of nineteen sovereign countries and two unions"
    item = ex([long_answer], scoring="rouge_l")
    scorer = Scorer(EvaluateStep.from_params(params), tiny_model_dir)
    n = len(scorer.tokenizer(long_answer, add_special_tokens=False)["input_ids"])
    assert n > 8
    budget = scorer.budget(item, new_task=True)
    assert budget % 8 == 0 and n + params.evaluate.answer_margin_tokens <= budget < n + 16
    assert scorer.budget(item, new_task=False) == budget  # a release's item kept as a probe
    assert scorer.budget(ex(["Accra"]), new_task=False) == params.evaluate.max_new_tokens
    fixed = params.with_overrides({"evaluate.new_task_max_new_tokens": 4})
    assert Scorer(EvaluateStep.from_params(fixed), tiny_model_dir).budget(item, True) == 4
