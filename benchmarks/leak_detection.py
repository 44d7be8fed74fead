"""Leak detection (``flows/core/leaks.py``): false positives on the project's real data, detection of
generated leaks, and the time it adds to a validation.

False positives: every text that must not match, against every reference it must not match,
on the data the project builds (nothing here is a leak, so every match is a false positive):

- the demo (``flows.demo.build.build_demo``): each release's train/eval prompts and completions
  against the probe prompts of every probe source; each release's eval prompts against its own
  train prompts and completions (and the other way round); each release against the eval prompts
  of the other release (the eval items of a learned release become probes); release 2 against
  the probes once release 1 is learned; the rehearsal prompts against the probes; the probe
  prompts against each other (two halves by key);
- the releases the benchmarks train on: ``smollm2_demo``, ``smollm2_two_releases``,
  ``smollm2_wise_sweep``, ``padding_free``, ``gpu_throughput`` and ``score_cache`` take
  ``demo_releases(build_demo(...))`` and the first general-knowledge source
  (``general_knowledge_source``); ``permuted_digits``, ``split_digits``,
  ``replay_permuted_digits``, ``replay_overhead`` and ``strategy_overhead`` build tensors (digit
  images, random tokens), no text release, so there is nothing to compare there;
- the tests' capitals and order-status releases (``tests/flows/pretrained_tiny.py``): templated
  prompts that differ in one word or one number;
- at scale: 10,000 templated probes ("Which of these best describes <title>?", one per Wikipedia
  article of the demo's source) against 3,000 topic prompts of up to 2,000 characters.

Detection: the probe prompts and eval prompts of the demo as the references, and from each a
leak of every family (prefix, suffix, an instruction appended, a letter swapped for a look-alike,
the prompt as a completion, a one-letter typo in a prompt of 40+ characters, whitespace,
punctuation and case changed); detected when ``find`` names a reference with the source's key.

Timing: a validation of the demo's release 2 once release 1 is learned, as ``validate_step``
would run it: the index of the probe prompts and release 1's eval prompts, queried with every
prompt and completion of release 2 and the rehearsal prompts, and the index of its train
prompts and completions queried with its eval prompts; the first run in the process (the
confusables loaded) and the median of 5.

    .venv/bin/python benchmarks/leak_detection.py          # ~20 s on 2 cores
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import unicodedata
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.core import leaks  # noqa: E402
from flows.core.data import load_probes, load_release  # noqa: E402
from flows.core.leaks import LeakIndex, leak_key  # noqa: E402
from flows.demo.build import (  # noqa: E402
    FIRST_GENERAL_KNOWLEDGE,
    PROBE_FILES,
    build_demo,
    demo_releases,
    first_sentences,
    general_knowledge_source,
    topic_prompt,
    wiki_summaries,
)

OUT = ROOT / "benchmarks" / "results" / "leak_detection.json"
SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95)

PREFIXES = [
    "Question: ",
    "Q: ",
    "Answer the following question.\n",
    "You are a helpful assistant.\n\n",
    "Please answer this: ",
    "Tell me ",
    "Quiz time! ",
]
SUFFIXES = [
    " Be brief.",
    "\nThink step by step.",
    " (Reply with a single word.)",
    "\n\nAnswer:",
    " Thanks!",
]
INSTRUCTION = "Answer in one word."
LOOK_ALIKES = {  # Latin letter -> a Cyrillic or Greek letter that looks the same
    "a": "\u0430", "c": "\u0441", "e": "\u0435", "i": "\u0456", "j": "\u0458", "o": "\u03bf",
    "p": "\u0440", "s": "\u0455", "x": "\u0445", "y": "\u0443", "h": "\u04bb", "A": "\u0391",
    "B": "\u0412", "C": "\u0421", "E": "\u0395", "H": "\u041d", "I": "\u0406", "K": "\u039a",
    "M": "\u041c", "O": "\u041e", "P": "\u03a1", "T": "\u0422", "X": "\u03a7", "Y": "\u03a5",
}  # fmt: skip


# the data -----------------------------------------------------------------------------------
def release_texts(folder: Path, split: str) -> tuple[list[str], list[str]]:
    """(prompts, completions) of a release split, chat messages joined as the pipeline does."""
    examples = load_release(folder, split)
    return [ex.prompt_text for ex in examples], [ex.completion for ex in examples]


def probe_prompts(paths: list[Path]) -> list[str]:
    return [ex.prompt_text for path in paths for ex in load_probes(path)]


def halves(texts: list[str]) -> tuple[list[str], list[str]]:
    """Two halves by key (a text and its duplicates on one side), for texts against each other."""
    keys = sorted({leak_key(t) for t in texts})
    first = set(keys[::2])
    return [t for t in texts if leak_key(t) in first], [
        t for t in texts if leak_key(t) not in first
    ]


def demo_datasets(demo: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(origin, name, references, texts) of the demo: nothing in texts leaks a reference."""
    probes = probe_prompts([demo / "probes" / f for f in [FIRST_GENERAL_KNOWLEDGE, *PROBE_FILES]])
    releases = demo_releases(demo)
    split = {r.name: {s: release_texts(r, s) for s in ("train", "eval")} for r in releases}
    out = []
    for name, s in split.items():
        everything = s["train"][0] + s["train"][1] + s["eval"][0] + s["eval"][1]
        out.append(
            ("demo", f"{name}: prompts and completions vs probe prompts", probes, everything)
        )
        train = s["train"][0] + s["train"][1]
        out.append(
            ("demo", f"{name}: eval prompts vs train prompts and completions", train, s["eval"][0])
        )
        out.append(
            ("demo", f"{name}: train prompts and completions vs eval prompts", s["eval"][0], train)
        )
        for other, o in split.items():
            if other != name:
                out.append(
                    (
                        "demo",
                        f"{name}: prompts and completions vs {other} eval prompts",
                        o["eval"][0],
                        everything,
                    )
                )
    first, second = releases[0].name, releases[1].name
    learned = probes + split[first]["eval"][0]
    everything = [t for part in ("train", "eval") for texts in split[second][part] for t in texts]
    out.append(
        (
            "demo",
            f"{second} once {first} is learned: vs probes and {first} eval prompts",
            learned,
            everything,
        )
    )
    rehearsal = [
        r["prompt"]
        for r in map(
            json.loads, (demo / "rehearsal" / "general_prompts.jsonl").read_text().splitlines()
        )
    ]
    out.append(("demo", "rehearsal prompts vs probe prompts", probes, rehearsal))
    a, b = halves(probes)
    out.append(("demo", "probe prompts against each other (half vs half)", a, b))
    out.append(("demo", "probe prompts against each other (the other half)", b, a))
    for name, s in split.items():
        a, b = halves(s["train"][0] + s["eval"][0])
        out.append(("demo", f"{name}: prompts against each other (half vs half)", a, b))
    return out


def benchmark_datasets(demo: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """What the text benchmarks train and probe on: the demo releases and the first
    general-knowledge source; at release 2 (smollm2_two_releases, smollm2_demo --release 2) the
    probes hold release 1's eval items too."""
    probes = probe_prompts([general_knowledge_source(demo)])
    releases = demo_releases(build_demo(demo))
    out = []
    for i, release in enumerate(releases):
        texts = [t for part in ("train", "eval") for ts in release_texts(release, part) for t in ts]
        refs = probes + [p for r in releases[:i] for p in release_texts(r, "eval")[0]]
        out.append(
            (
                "benchmarks",
                f"{release.name} vs general knowledge probes"
                + (" and earlier eval prompts" if i else ""),
                refs,
                texts,
            )
        )
    return out


def test_suite_datasets() -> list[tuple[str, str, list[str], list[str]]]:
    """The tests' old task (capitals) and new release (order status)."""
    from tests.flows.pretrained_tiny import split_old_task, write_new_release

    probes, rehearsal = split_old_task()
    with tempfile.TemporaryDirectory() as tmp:
        release = write_new_release(Path(tmp))
        train, evaluation = release_texts(release, "train"), release_texts(release, "eval")
    refs = [p["prompt"] for p in probes]
    texts = train[0] + train[1] + evaluation[0] + evaluation[1]
    return [
        ("tests", "order-status release vs capital probes", refs, texts),
        (
            "tests",
            "capital rehearsal prompts vs capital probes",
            refs,
            [r["prompt"] for r in rehearsal],
        ),
        (
            "tests",
            "order-status eval prompts vs train prompts and completions",
            train[0] + train[1],
            evaluation[0],
        ),
    ]


def scale_dataset() -> tuple[list[str], list[str]]:
    """10,000 templated probes and 3,000 topic prompts of up to 2,000 characters."""
    articles = sorted(wiki_summaries().values(), key=lambda a: a["title"])
    refs = [f"Which of these best describes {a['title']}?" for a in articles][:10_000]
    topics = ["People", "Geography", "Arts", "History", "Mathematics", "Technology"]
    rng = random.Random(0)
    chosen = rng.sample([a for a in articles if len(a.get("extract", "")) > 80], 3000)
    texts = [topic_prompt(first_sentences(a["extract"], 1880), topics) for a in chosen]
    return refs, texts


# false positives ----------------------------------------------------------------------------
def false_positives(datasets, threshold: float = leaks.DEFAULT_THRESHOLD) -> list[dict]:
    rows = []
    for origin, name, refs, texts in datasets:
        index = LeakIndex(refs, threshold=threshold)
        flagged = [(t, leak) for t in texts if (leak := index.find(t))]
        rows.append(
            {
                "origin": origin,
                "dataset": name,
                "references": len(refs),
                "distinct_references": len(index),
                "texts": len(texts),
                "comparisons": len(refs) * len(texts),
                "false_positives": len(flagged),
                "examples": [
                    {
                        "text": t[:200],
                        "reference": refs[leak.reference][:200],
                        "why": leak.describe(),
                    }
                    for t, leak in flagged[:5]
                ],
            }
        )
    return rows


# generated leaks -----------------------------------------------------------------------------
def typo(text: str, rng: random.Random) -> str:
    """One letter substituted, deleted, doubled or swapped with its neighbour."""
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    i = rng.choice(letters)
    op = rng.choice(["substitute", "delete", "insert", "transpose"])
    if op == "substitute":
        new = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != text[i].lower()])
        return text[:i] + new + text[i + 1 :]
    if op == "delete":
        return text[:i] + text[i + 1 :]
    if op == "insert":
        return text[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + text[i:]
    j = i + 1 if i + 1 < len(text) and text[i + 1].isalpha() else i - 1
    if j < 0 or not text[j].isalpha():
        return text[:i] + text[i + 1 :]
    a, b = sorted((i, j))
    return text[:a] + text[b] + text[a] + text[b + 1 :]


def look_alike(text: str, rng: random.Random) -> str | None:
    places = [i for i, c in enumerate(text) if c in LOOK_ALIKES]
    if not places:
        return None
    i = rng.choice(places)
    return text[:i] + LOOK_ALIKES[text[i]] + text[i + 1 :]


def restyled(text: str, rng: random.Random) -> str:
    """Whitespace, punctuation and case changed: one of several restylings."""
    styles = [
        lambda t: t.upper(),
        lambda t: t.lower().rstrip("?.!") + " ???",
        lambda t: "  ".join(t.split()),
        lambda t: t.replace(" ", "\n", 2),
        lambda t: t.replace("?", "").replace(",", " ,").replace(".", " . "),
        lambda t: t.title(),
        lambda t: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in t),  # full width
        lambda t: t.replace(" ", "\u200b ", 3),
    ]
    return rng.choice(styles)(text)


def families(source: str, answer: str, rng: random.Random) -> dict[str, str | None]:
    return {
        "prefix added": rng.choice(PREFIXES) + source,
        "suffix added": source + rng.choice(SUFFIXES),
        "instruction appended": f"{source} {INSTRUCTION}",
        "one letter swapped for a look-alike": look_alike(source, rng),
        "prompt used as a completion": rng.choice(
            [source, f"{source} {answer}", f"Q: {source}\nA: {answer}"]
        ),
        "one-letter typo (prompt of 40+ characters)": typo(source, rng)
        if len(source) >= 40
        else None,
        "whitespace, punctuation and case changed": restyled(source, rng),
    }


def detection(demo: Path, threshold: float = leaks.DEFAULT_THRESHOLD) -> dict:
    sources: dict[str, tuple[str, str, str]] = {}  # key -> (prompt, an answer, what it is)
    for f in [FIRST_GENERAL_KNOWLEDGE, *PROBE_FILES]:
        for ex in load_probes(demo / "probes" / f):
            sources.setdefault(leak_key(ex.prompt_text), (ex.prompt_text, ex.answers[0], "probe"))
    for release in demo_releases(demo):
        for ex in load_release(release, "eval"):
            item = (ex.prompt_text, ex.completion, "eval prompt")
            sources.setdefault(leak_key(ex.prompt_text), item)
    refs = [prompt for prompt, _, _ in sources.values()]
    index = LeakIndex(refs, threshold=threshold)
    rng = random.Random(0)
    result: dict[str, dict] = {}
    for key, (prompt, answer, what) in sources.items():
        for family, leak in families(prompt, answer, rng).items():
            if leak is None:
                continue
            row = result.setdefault(
                family, {"tried": 0, "detected": 0, "kinds": {}, "by_source": {}, "missed": []}
            )
            by = row["by_source"].setdefault(what, {"tried": 0, "detected": 0})
            row["tried"] += 1
            by["tried"] += 1
            found = index.find(leak)
            if found is not None and leak_key(refs[found.reference]) == key:
                row["detected"] += 1
                by["detected"] += 1
                row["kinds"][found.kind] = row["kinds"].get(found.kind, 0) + 1
            elif len(row["missed"]) < 8:
                row["missed"].append({"source": prompt[:120], "leak": leak[:120]})
    for row in result.values():
        row["rate"] = row["detected"] / row["tried"]
        for by in row["by_source"].values():
            by["rate"] = by["detected"] / by["tried"]
    return result


# timing ---------------------------------------------------------------------------------------
def validation_run(demo: Path) -> dict:
    """One validation of release 2 after release 1: both indexes built, every text queried."""
    first, second = demo_releases(demo)[:2]
    probes = probe_prompts([demo / "probes" / f for f in PROBE_FILES])
    probes += release_texts(first, "eval")[0]
    train, evaluation = release_texts(second, "train"), release_texts(second, "eval")
    rehearsal = [
        json.loads(line)["prompt"]
        for line in (demo / "rehearsal" / "general_prompts.jsonl").read_text().splitlines()
    ]
    texts = train[0] + train[1] + evaluation[0] + evaluation[1] + rehearsal
    index = LeakIndex(probes)
    flagged = sum(index.find(text) is not None for text in texts)
    own = LeakIndex(train[0] + train[1])
    flagged += sum(own.find(text) is not None for text in evaluation[0])
    return {
        "probe_references": len(probes),
        "texts_against_probes": len(texts),
        "train_references": len(train[0]) * 2,
        "eval_prompts_against_train": len(evaluation[0]),
        "flagged": flagged,
    }


def timing(demo: Path) -> dict:
    for cached in (leaks._prototypes, leaks._plain, leaks._capital, leaks._word):
        cached.cache_clear()
    leaks._SEPARATORS.clear()
    start = time.perf_counter()
    case = validation_run(demo)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(5):
        leaks._word.cache_clear()  # each validation normalises its words afresh
        start = time.perf_counter()
        validation_run(demo)
        warm.append(time.perf_counter() - start)
    reading = []
    for _ in range(5):  # the reading of the files alone, to subtract
        start = time.perf_counter()
        first, second = demo_releases(demo)[:2]
        probe_prompts([demo / "probes" / f for f in PROBE_FILES])
        release_texts(first, "eval"), release_texts(second, "train"), release_texts(second, "eval")
        reading.append(time.perf_counter() - start)
    return {
        "case": "release 2 once release 1 is learned: the probe sources' prompts and release 1's "
        "eval prompts against release 2's prompts, completions and the rehearsal prompts; "
        "release 2's train prompts and completions against its eval prompts",
        **case,
        "cold_seconds": cold,
        "warm_seconds_median": statistics.median(warm),
        "warm_seconds": warm,
        "reading_files_seconds_median": statistics.median(reading),
    }


def scale_timing() -> dict:
    refs, texts = scale_dataset()
    start = time.perf_counter()
    index = LeakIndex(refs)
    built = time.perf_counter() - start
    start = time.perf_counter()
    flagged = [t for t in texts if index.find(t)]
    queried = time.perf_counter() - start
    return {
        "references": len(refs),
        "texts": len(texts),
        "mean_text_chars": sum(map(len, texts)) / len(texts),
        "build_seconds": built,
        "query_seconds": queried,
        "false_positives": len(flagged),
        "examples": [t[:200] for t in flagged[:5]],
    }


# report ------------------------------------------------------------------------------------
def table(results: dict) -> str:
    lines = [
        "| origin | dataset | references | texts | comparisons | false positives |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results["false_positives"]:
        lines.append(
            f"| {r['origin']} | {r['dataset']} | {r['references']:,} | {r['texts']:,} "
            f"| {r['comparisons']:,} | {r['false_positives']} |"
        )
    s = results["scale"]
    lines.append(
        f"| scale | templated probes vs long topic prompts | {s['references']:,} | {s['texts']:,} "
        f"| {s['references'] * s['texts']:,} | {s['false_positives']} |"
    )
    lines += [
        "",
        "| generated leak | tried | detected | rate | of probes | of eval prompts |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for family, row in results["detection"].items():
        by = [row["by_source"].get(w) for w in ("probe", "eval prompt")]
        split = " | ".join(f"{b['detected']}/{b['tried']}" if b else "–" for b in by)
        lines.append(
            f"| {family} | {row['tried']} | {row['detected']} | {row['rate']:.1%} | {split} |"
        )
    lines += [
        "",
        "| threshold | false positives (all datasets) | typos detected |",
        "|---:|---:|---:|",
    ]
    for row in results["threshold_sweep"]:
        lines.append(f"| {row['threshold']} | {row['false_positives']} | {row['typo_rate']:.1%} |")
    t = results["timing"]
    lines += [
        "",
        f"Validation of the demo's release 2 (leak checks only): {t['cold_seconds']:.2f} s cold, "
        f"{t['warm_seconds_median']:.2f} s warm (median of 5), of which reading the files "
        f"{t['reading_files_seconds_median']:.2f} s; at scale: {s['references']:,} references "
        f"indexed in {s['build_seconds']:.2f} s, {s['texts']:,} texts "
        f"(mean {s['mean_text_chars']:.0f} characters) queried in {s['query_seconds']:.2f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        demo = build_demo(Path(tmp) / "demo")
        timed = timing(demo)  # first: the cold run loads the confusables
        datasets = demo_datasets(demo) + benchmark_datasets(demo) + test_suite_datasets()
        fp = false_positives(datasets)
        found = detection(demo)
        sweep = []
        for threshold in SWEEP:
            rows = false_positives(datasets, threshold)
            typos = detection(demo, threshold)["one-letter typo (prompt of 40+ characters)"]
            sweep.append(
                {
                    "threshold": threshold,
                    "false_positives": sum(r["false_positives"] for r in rows),
                    "typo_rate": typos["rate"],
                }
            )
    results = {
        "settings": {
            "threshold": leaks.DEFAULT_THRESHOLD,
            "min_chars": leaks.DEFAULT_MIN_CHARS,
            "min_words": leaks.MIN_WORDS,
            "template_references": leaks.TEMPLATE_REFERENCES,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "unicode": unicodedata.unidata_version,
            "confusable-homoglyphs": version("confusable-homoglyphs"),
        },
        "not_text": [
            "permuted_digits.py",
            "split_digits.py",
            "replay_permuted_digits.py",
            "replay_overhead.py",
            "strategy_overhead.py",
        ],
        "false_positives": fp,
        "scale": scale_timing(),
        "detection": found,
        "threshold_sweep": sweep,
        "timing": timed,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
