import json

from flows.core.data import load_probes, load_release
from flows.demo.build import RELEASE_TOPICS, build_demo


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
        for name in RELEASE_TOPICS
    ]
    assert not sources[0] & sources[1]


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
