import json

from flows.core.data import load_probes, load_release
from flows.demo.build import RELEASE_TOPICS, RELEASES, build_demo, demo_releases


def test_demo_is_deterministic_and_releases_do_not_share_articles(tmp_path, demo_dir):
    again = build_demo(tmp_path / "again")
    for f in ["releases/wiki-topics-1/train.jsonl", "probes/general_knowledge.jsonl"]:
        assert (again / f).read_text() == (demo_dir / f).read_text()
    sources = [
        {
            json.loads(line)["source"]
            for split in ("train", "eval")
            for line in (demo_dir / "releases" / name / f"{split}.jsonl").read_text().splitlines()
        }
        for name in RELEASES
    ]
    for i, mine in enumerate(sources):
        assert len(mine) >= 200 and not any(mine & other for other in sources[i + 1 :])
    assert [r.name for r in demo_releases(demo_dir)] == list(RELEASES)
    assert len(set(RELEASES.values())) >= 3  # kinds: classification, extraction/QA, free text


def test_releases_of_other_kinds_are_answerable_from_their_text(demo_dir):
    """Extraction and question answering give the answer in the prompt; free text is an
    encyclopedia's description that no probe offers as an answer or a choice; all are scored
    by ROUGE-L (no choices)."""
    probed = {
        a.lower()
        for f in (demo_dir / "probes").glob("*.jsonl")
        for p in load_probes(f)
        for a in [*p.answers, *p.choices]
    }
    for name in ("wiki-first-year", "wiki-population", "wiki-describe-1", "wiki-describe-2"):
        items = [
            ex
            for split in ("train", "eval")
            for ex in load_release(demo_dir / "releases" / name, split)
        ]
        assert all(ex.scoring == "rouge_l" and not ex.choices for ex in items)
        if RELEASES[name] == "free text":
            assert all(ex.completion.lower() not in probed for ex in items)
            assert len({ex.completion for ex in items}) == len(items)
        else:
            assert all(ex.completion in ex.prompt_text for ex in items)


def test_each_release_is_a_balanced_topic_task_with_its_own_labels(demo_dir):
    for name, topics in RELEASE_TOPICS.items():
        train = load_release(demo_dir / "releases" / name, "train")
        labels = [ex.completion for ex in train]
        assert set(labels) == set(topics)
        assert max(labels.count(t) for t in topics) - min(labels.count(t) for t in topics) <= 1
        assert all(ex.choices == topics and ex.completion in ex.prompt_text for ex in train[:5])


def test_general_knowledge_probes(demo_dir):
    probes = load_probes(demo_dir / "probes" / "general_knowledge.jsonl")
    capitals = [p for p in probes if p.category == "capitals"]
    described = [p for p in probes if p.category == "descriptions"]
    assert len(capitals) >= 100 and len(described) == 60
    assert any(
        p.prompt_text == "What is the capital of Ghana?" and p.answers == ["Accra"]
        for p in capitals
    )
    assert all(p.answers[0] in p.choices and len(p.choices) == 4 for p in described)
    assert all(p.answers[0].lower() not in p.prompt_text.lower() for p in capitals)
