"""Leak detection (flows/core/leaks.py): every kind of leak a reviewer would call one, and none in the
project's real data (the demo built by ``flows.demo.build.build_demo``)."""

from __future__ import annotations

import json

import pytest

from flows.core.data import load_probes, load_release
from flows.core.leaks import Leak, LeakIndex, leak_key
from flows.demo.build import FIRST_GENERAL_KNOWLEDGE, PROBE_FILES, RELEASE_TOPICS, topic_prompt

TOPICS_1, TOPICS_2 = RELEASE_TOPICS["wiki-topics-1"], RELEASE_TOPICS["wiki-topics-2"]
CEBU = (
    "Cebu City, officially the City of Cebu, is a highly urbanized city in the Central Visayas "
    "region of the Philippines."
)
WOOL = (
    "Wool is the textile fiber obtained from sheep and other mammals, especially goats, rabbits, "
    "and camelids."
)
PROBES = [
    "What is the capital of Ghana?",
    "What is the capital of France?",
    "What is the capital of Guinea?",
    "What is the capital of Niger?",
    "On which continent is Iran?",
    "In which country is the city of Abeokuta?",
    "Which of these best describes Ada Lovelace?",
    "What is the currency of Mozambique?",
    topic_prompt(CEBU, TOPICS_1),  # an eval item of a learned release
]
# More probes of the same templates, as a probe set holds them: they show which words are the
# template (in many references) and which make the item (in a few).
COUNTRIES = [
    "Peru",
    "Chile",
    "Kenya",
    "Japan",
    "Spain",
    "Italy",
    "Egypt",
    "Nepal",
    "Norway",
    "Sweden",
    "Poland",
    "Greece",
    "Mali",
    "Chad",
    "Oman",
    "Cuba",
    "Togo",
    "Fiji",
]
CITIES = [
    "Lagos",
    "Kano",
    "Ibadan",
    "Accra",
    "Kumasi",
    "Lima",
    "Quito",
    "Osaka",
    "Kyoto",
    "Lyon",
    "Porto",
    "Turin",
    "Krakow",
    "Gdansk",
    "Bergen",
    "Malmo",
    "Patras",
    "Cusco",
]
TITLES = [
    "Harmony",
    "Kite",
    "Photosynthesis",
    "Alan Turing",
    "Marie Curie",
    "Volcano",
    "Opera",
    "Chess",
    "Printing press",
    "Silk Road",
    "Glacier",
    "Telescope",
]
MORE = (
    [f"What is the capital of {c}?" for c in COUNTRIES]
    + [f"On which continent is {c}?" for c in COUNTRIES]
    + [f"What is the currency of {c}?" for c in COUNTRIES]
    + [f"In which country is the city of {c}?" for c in CITIES]
    + [f"Which of these best describes {t}?" for t in TITLES]
)  # fmt: skip


ALL = PROBES + MORE


@pytest.fixture(scope="module")
def index() -> LeakIndex:
    return LeakIndex(ALL)


def kind_of(index: LeakIndex, text: str) -> tuple[str, str] | None:
    """(kind, the reference) of the strongest leak of ``text``, or None."""
    leak = index.find(text)
    return None if leak is None else (leak.kind, ALL[leak.reference])


# the key ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of Ghana?",
        "WHAT IS THE CAPITAL OF GHANA",
        "  what   is the capital\tof ghana ?!",
        "What is the capital of Gh\u0430na?",  # Cyrillic a
        "Wh\u0430t is the c\u0430pit\u0430l \u03bff Gh\u0430na?",  # Cyrillic a, Greek omicron
        "\uff37\uff48\uff41\uff54 is the capital of Ghana?",  # full-width letters
        "What is the capi\u200btal of Ghana?",  # a zero-width space
        "What is the capital of Gh\u00e0na?",  # an accent
    ],
)
def test_the_key_ignores_case_spacing_punctuation_and_look_alikes(text):
    assert leak_key(text) == "what is the capital of ghana"


def test_the_key_keeps_words_numbers_and_symbols_apart():
    assert leak_key("What's 2+2?") == "what s 2 + 2"
    assert leak_key("What is 2-2?") != leak_key("What is 2+2?")
    assert leak_key("\u041cozambique") == "mozambique"  # a Cyrillic capital in a Latin word
    assert leak_key("\u0406ran") == leak_key("Iran") == "iran"  # Cyrillic I, not "l"
    assert leak_key("ΣΊΣΥΦΟΣ") == leak_key("σίσυφος")  # a Greek word, in capitals or not
    assert leak_key("Mali") == "mali"  # ASCII is not mapped ("m" is not "rn")


@pytest.mark.parametrize("text", [*PROBES, "Ḩamāh, Сосоа & ΣΊΣΥΦΟΣ — 50 %"])
def test_the_key_is_its_own_key(text):
    assert leak_key(leak_key(text)) == leak_key(text)


# every family of leak --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "kind", "reference"),
    [
        # whitespace, punctuation, case, look-alikes: the same text
        ("what is the capital of ghana", "same", PROBES[0]),
        ("What is the capital of Gh\u0430na?", "same", PROBES[0]),
        ("Wh\u0430t is th\u0435 capital \u03bff Ghana?", "same", PROBES[0]),
        ("What is the currency of \u041cozambique?", "same", PROBES[7]),
        ("On which continent is \u0406ran?", "same", PROBES[4]),
        # a prefix, a suffix, an instruction appended
        ("Question: What is the capital of Ghana?", "contains", PROBES[0]),
        ("Tell me what is the capital of Ghana", "contains", PROBES[0]),
        ("What is the capital of Ghana? Answer in one word.", "contains", PROBES[0]),
        ("On which continent is Iran?\nThink step by step.", "contains", PROBES[4]),
        (f"Classify this.\n{PROBES[-1]} Be brief", "contains", PROBES[-1]),
        # a probe or eval prompt used as a completion
        ("Q: What is the capital of Ghana?\nA: Accra", "contains", PROBES[0]),
        (f"{PROBES[-1]}\nGeography", "contains", PROBES[-1]),
        # a text inside a reference: a truncated eval prompt
        (topic_prompt(CEBU.split(" is a")[0], TOPICS_1), "contained", PROBES[-1]),
        # one-letter typos in prompts of 40+ characters
        ("Which of these best descibes Ada Lovelace?", "near-duplicate", PROBES[6]),
        ("In which contry is the city of Abeokuta?", "near-duplicate", PROBES[5]),
        (topic_prompt(CEBU.replace("urbanized", "urbanised"), TOPICS_1), "near-duplicate",
         PROBES[-1]),
        ("Hint: which of these best describes Ada Lovelace?!", "contains", PROBES[6]),
    ],
)  # fmt: skip
def test_each_family_of_leak_is_found(index, text, kind, reference):
    assert kind_of(index, text) == (kind, reference)


def test_near_duplicate_scores_and_describes_itself(index):
    leak = index.find("Which of these best descibes Ada Lovelace?")
    assert leak.kind == "near-duplicate" and 0.9 <= leak.score < 1
    assert leak.describe().startswith("near-duplicate (0.9")
    assert Leak(0, "contains", 1.0).describe() == "contains it after normalisation"
    assert Leak(0, "same", 1.0).describe() == "the same text after normalisation"
    assert "part of it" in Leak(0, "contained", 1.0).describe()


def test_the_strongest_leak_and_the_first_reference_are_reported():
    index = LeakIndex(["What is the capital of Ghana?", "WHAT IS THE CAPITAL OF GHANA", "Ghana?"])
    assert index.find("what is the capital of ghana!") == Leak(0, "same", 1.0)
    assert index.find("Quiz: What is the capital of Ghana?") == Leak(0, "contains", 1.0)
    assert len(index) == 2  # the second is the first, by key


# what is not a leak ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "Arts",
        "Geography",
        "Physical sciences",
        "Ghana",
        "Accra",
        "What is the capital of Germany?",  # the same template, other content
        "What is the capital of Nigeria?",
        "What is the capital of Guinea-Bissau?",  # words added after the item
        "What is the capital of Equatorial Guinea?",
        "On which continent is Iraq?",  # one letter apart, but the letter is the item
        "In which country is the city of Abuja?",
        "Which of these best describes Ada Byron?",
        "What is the capital of Ghsna?",  # a typo in the word that makes the item: not found
        "Which of these best describes Harmony of the Seas?",
        "country is the city of Abeokuta",  # a phrase of a probe, not the probe
        topic_prompt(WOOL, TOPICS_1),  # the topic template, another article
        topic_prompt(WOOL, TOPICS_2),
    ],
)
def test_short_texts_and_other_content_are_not_leaks(index, text):
    assert index.find(text) is None, index.find(text)


def test_labels_shared_by_many_references_are_template_text():
    """A completion that is a label in every prompt of its release is not a leak of any, one way
    or the other; the whole prompt still is."""
    prompts = [topic_prompt(s, TOPICS_2) for s in (CEBU, WOOL, "Photosynthesis is a process.")]
    completions = ["Society and social sciences", "Everyday life", "Biology and health sciences"]
    assert LeakIndex(prompts).find("Society and social sciences") is None
    by_train = LeakIndex(prompts + completions)
    assert by_train.find(topic_prompt("Kites fly in the wind.", TOPICS_2)) is None
    assert by_train.find(prompts[0]).kind == "same"
    assert by_train.find("Society and social sciences").kind == "same"


def test_numbers_are_never_misspelt():
    train = [f"What is the status of order {n}?" for n in range(4800, 4900, 2)]
    index = LeakIndex(train)
    assert index.find("What is the status of order 4821?") is None
    assert index.find("What is the status of order 48220?") is None
    leak = index.find("What is teh status of order 4822?")  # "the": a word of 50 references
    assert (leak.reference, leak.kind, round(leak.score, 2)) == (11, "near-duplicate", 0.98)


def test_a_small_index_does_not_take_one_word_for_another():
    """Without other references to show the template, one changed word in six is 0.83 of the
    words kept: under the threshold."""
    index = LeakIndex(["What is the capital of Niger?"])
    assert index.find("What is the capital of Tiger?") is None
    assert index.find("What is the capital of Nigeria?") is None
    assert LeakIndex(["On which continent is Iran?"]).find("On which continent is Iraq?") is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        LeakIndex(PROBES, threshold=0)
    with pytest.raises(ValueError, match="min_chars"):
        LeakIndex(PROBES, min_chars=0)
    assert LeakIndex([]).find("What is the capital of Ghana?") is None
    assert LeakIndex(PROBES).find("?!") is None


# the real data: no false positive -------------------------------------------------------------
def texts(release, split: str) -> tuple[list[str], list[str]]:
    examples = load_release(release, split)
    return [ex.prompt_text for ex in examples], [ex.completion for ex in examples]


def flagged(references: list[str], queries: list[str]) -> list[tuple[str, str, str]]:
    index = LeakIndex(references)
    found = ((q, index.find(q)) for q in queries)
    return [(q[:80], references[leak.reference][:80], leak.kind) for q, leak in found if leak]


def test_no_false_positive_on_the_demo_data(demo_dir):
    probe_files = [demo_dir / "probes" / f for f in [FIRST_GENERAL_KNOWLEDGE, *PROBE_FILES]]
    probes = [ex.prompt_text for f in probe_files for ex in load_probes(f)]
    releases = {name: demo_dir / "releases" / name for name in RELEASE_TOPICS}
    split = {name: {s: texts(r, s) for s in ("train", "eval")} for name, r in releases.items()}
    rehearsal = [
        json.loads(line)["prompt"]
        for line in (demo_dir / "rehearsal" / "general_prompts.jsonl").read_text().splitlines()
    ]
    assert len(probes) > 2000 and len(rehearsal) == 200
    assert not flagged(probes, rehearsal)
    for name, s in split.items():
        everything = s["train"][0] + s["train"][1] + s["eval"][0] + s["eval"][1]
        train = s["train"][0] + s["train"][1]
        assert not flagged(probes, everything), name
        assert not flagged(train, s["eval"][0]), name
        assert not flagged(s["eval"][0], train), name
        for other, o in split.items():
            if other != name:
                assert not flagged(o["eval"][0], everything), (name, other)
                assert not flagged(probes + o["eval"][0], everything), (name, other)


def test_the_demo_probes_leak_when_pasted_into_a_release(demo_dir):
    """The other half of the same data: each probe prompt, changed as a leak would change it, is
    found among all the probes."""
    probes = [ex.prompt_text for f in PROBE_FILES for ex in load_probes(demo_dir / "probes" / f)]
    index = LeakIndex(probes)
    for probe in probes[::50]:
        for leak in [f"Question: {probe} Answer in one word.", probe.upper(), f"{probe}\nAccra"]:
            found = index.find(leak)
            assert found is not None and leak_key(probes[found.reference]) == leak_key(probe)
