"""Probe sampling with power (enough items the champion knows) and the dev/test split."""

from __future__ import annotations

from collections import Counter

from flows.steps.probes import (
    known_needed,
    sample_with_known,
    sampling_order,
    split_dev_test,
    stratified,
)


def items(task: str, per_category: dict[str, int]) -> list[dict]:
    return [
        {
            "id": f"{task}-{cat}-{i:03d}",
            "task": task,
            "category": cat,
            "prompt": f"{cat} {i}",
            "answers": ["x"],
        }
        for cat, n in per_category.items()
        for i in range(n)
    ]


class KnowsIds:
    """Answers right exactly the items whose id it knows (the sampling logic is what is tested;
    the real scorer is exercised by the retrain tests)."""

    def __init__(self, known: set[str]):
        self.known, self.scored = known, []

    def score(self, examples) -> list[dict]:
        self.scored += [ex.id for ex in examples]
        return [
            {"id": ex.id, "task": ex.task, "category": ex.category, "correct": ex.id in self.known}
            for ex in examples
        ]


def test_first_sample_is_the_stratified_sample_then_the_rest_round_robin():
    pool = items("gk", {"capitals": 30, "descriptions": 12})
    (queue, first), *_ = sampling_order(pool, per_group=10, seed=0).values()
    assert first == 20
    assert queue[:first] == stratified(pool, 10, 0)
    assert sorted(r["id"] for r in queue) == sorted(r["id"] for r in pool)  # every item, once
    rest_cats = [r["category"] for r in queue[first:]]
    assert rest_cats[:4] == ["capitals", "descriptions", "capitals", "descriptions"]
    assert sampling_order(pool, 10, 0) == sampling_order(pool, 10, 0)
    assert sampling_order(pool, 10, 1) != sampling_order(pool, 10, 0)


def test_more_items_are_drawn_until_the_champion_knows_enough():
    pool = items("gk", {"capitals": 100})
    knows = KnowsIds({r["id"] for r in pool[::4]})  # a quarter of the pool
    order = sampling_order(pool, per_group=20, seed=0)
    drawn, results = sample_with_known(order, needed={"gk": 20}, scorer=knows)
    assert sum(r["correct"] for r in results) >= 20
    assert len(drawn) < len(pool)  # it stopped once enough were known
    assert [r["id"] for r in drawn] == knows.scored  # each drawn item scored once, in order
    assert [r["id"] for r in drawn] == [r["id"] for r in order["gk"][0][: len(drawn)]]


def test_a_task_whose_sources_run_out_keeps_everything_it_has():
    pool = items("gk", {"capitals": 30})
    knows = KnowsIds({r["id"] for r in pool[:5]})
    drawn, results = sample_with_known(sampling_order(pool, 10, 0), needed={"gk": 20}, scorer=knows)
    assert len(drawn) == 30 and sum(r["correct"] for r in results) == 5


def test_dev_and_test_are_disjoint_and_stratified_by_category_and_champion_answer():
    pool = items("gk", {"capitals": 41, "descriptions": 17}) + items("old", {"": 23})
    correct = {(r["task"], r["id"]): i % 3 != 0 for i, r in enumerate(pool)}
    dev, test = split_dev_test(pool, correct, dev_fraction=0.5, seed=0)
    key = lambda r: (r["task"], r["id"])  # noqa: E731
    assert not {key(r) for r in dev} & {key(r) for r in test}
    assert len(dev) + len(test) == len(pool)
    stratum = lambda r: (r["task"], r["category"], correct[key(r)])  # noqa: E731
    d, t = Counter(map(stratum, dev)), Counter(map(stratum, test))
    for s in set(d) | set(t):
        assert abs(d[s] - t[s]) <= 1, s  # each stratum halved
    assert split_dev_test(pool, correct, 0.5, 0) == (dev, test)  # reproducible
    dev3, test3 = split_dev_test(pool, correct, dev_fraction=0.25, seed=0)
    assert abs(len(dev3) - 0.25 * len(pool)) <= 1


def test_known_needed_puts_min_known_in_the_test_part():
    assert known_needed(30, 0.5) == 60
    assert known_needed(30, 0.0) == 30
    assert known_needed(10, 0.3) == 15
